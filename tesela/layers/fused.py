"""Fused Triton kernels for the small ops between GEMMs (CUDA only).

An unfused Llama layer launches ~50 kernels outside its GEMMs (norms, rotary, activation, adds);
in a batch-1 decode step they, not the weights, set the time. Each kernel here replaces a chain
of PyTorch ops with one launch and reproduces that chain's rounding exactly (fp32 math, rounded
to the activation dtype where the PyTorch ops round), so fused and unfused outputs agree up to
one rounding step (the norm's summation order, the last bit of exp), and the transformers
reference still holds.

Layers call `fused_enabled(x)`; on CPU, without Triton, or under torch.compile (inductor fuses
the PyTorch ops itself) they keep their PyTorch ops.

Opaque ops. The compiled piecewise runner with `eager` pieces must run exactly the kernels the
eager model runs, or graphs on and off would compute different functions. While it traces
(`tracing_opaque(True)`), `fused_enabled` stays true under torch.compile and each kernel is
called through a `tesela::` custom op, which dynamo records as one opaque node (its shapes from
the `register_fake` function) and the piece later runs as the same kernel launch. Only a trace
pays the custom-op dispatch: outside torch.compile the public functions call the kernels
directly. The switch is read through `torch.compiler.assume_constant_result`, so it adds no
dynamo guard.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from tesela.core.intmath import next_power_of_2
from tesela.core.kv_cache import KVStoreTarget
from tesela.core.pdl import grid_dependency_sync, launch_kwargs
from tesela.core.recording import recording_ops

_DISABLED = False  # tests flip this to compare fused and unfused paths
_ON_CPU = False  # tests run the kernels on CPU tensors (under TRITON_INTERPRET=1)
_OPAQUE = False  # a trace in progress records the kernels as tesela:: custom ops
# Heads per program of the q/k norm + rotary kernel. Fixed (by the model's head counts only),
# so a token's rows come out the same in any batch, eager or replayed.
QK_HEADS = 8


def set_fused_enabled(enabled: bool, *, on_cpu: bool = False) -> None:
    """`on_cpu` also runs the kernels on CPU tensors: only under TRITON_INTERPRET=1 (tests)."""
    global _DISABLED, _ON_CPU
    _DISABLED = not enabled
    _ON_CPU = enabled and on_cpu


@contextlib.contextmanager
def tracing_opaque(opaque: bool) -> Iterator[None]:
    """While active, torch.compile traces the fused kernels as opaque custom ops (True) or
    traces the PyTorch ops (False, the default)."""
    global _OPAQUE
    previous, _OPAQUE = _OPAQUE, opaque
    try:
        yield
    finally:
        _OPAQUE = previous


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the PyTorch ops instead of the fused kernels (what torch.compile traces)."""
    global _DISABLED
    previous, _DISABLED = _DISABLED, True
    try:
        yield
    finally:
        _DISABLED = previous


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_enabled(x: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return _traced_opaque_on(x.is_cuda)
    return (x.is_cuda or _ON_CPU) and not _DISABLED and _triton_available()


def opaque_under_trace(x: torch.Tensor) -> bool:
    """Whether this call must record its kernel as a custom op: torch.compile is tracing it, or
    the CPU graph stand-in is recording ATen ops (which a Triton launch is not)."""
    if torch.compiler.is_compiling():
        return _traced_opaque_on(x.is_cuda)
    return recording_ops() and fused_enabled(x)


@torch.compiler.assume_constant_result
def _traced_opaque_on(is_cuda: bool) -> bool:
    # A trace-time constant: dynamo calls this instead of tracing it and installs no guard on
    # the globals it reads (each compiled runner traces its own code object, see compiled.py).
    return _OPAQUE and (is_cuda or _ON_CPU) and not _DISABLED and _triton_available()


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def rmsnorm_kernel(
        x_ptr, res_ptr, res_out_ptr, w_ptr, out_ptr,
        rows_per_group, stride_group, stride_row, stride_res, stride_out,
        n_cols, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        group, inner = row // rows_per_group, row % rows_per_group
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)  # a weight: before the wait
        grid_dependency_sync(PDL)
        x_offs = group.to(tl.int64) * stride_group + inner * stride_row + cols
        x = tl.load(x_ptr + x_offs, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            res_offs = row.to(tl.int64) * stride_res + cols
            r = tl.load(res_ptr + res_offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # residual + x, rounded
            tl.store(res_out_ptr + row.to(tl.int64) * stride_out + cols, x, mask=mask)
        xf = x.to(tl.float32)
        variance = tl.sum(xf * xf, axis=0) / n_cols
        y = (xf * tl.rsqrt(variance + eps)).to(x.dtype)
        out = (w.to(tl.float32) * y.to(tl.float32)).to(x.dtype)
        tl.store(out_ptr + row.to(tl.int64) * stride_out + cols, out, mask=mask)

    @triton.jit
    def rotary_kernel(
        x_ptr, out_ptr, cos_sin_ptr, pos_ptr,
        num_heads, stride_token, stride_cache_kind, stride_cache_pos,
        HALF: tl.constexpr, BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        token, head = tl.program_id(0), tl.program_id(1)
        cols = tl.arange(0, BLOCK)
        mask = cols < HALF
        dtype = x_ptr.dtype.element_ty
        # The position (a batch row) and its cos/sin before the wait (tesela/core/pdl.py).
        pos = tl.load(pos_ptr + token)
        cos_sin_row = cos_sin_ptr + pos.to(tl.int64) * stride_cache_pos + cols
        cos = tl.load(cos_sin_row, mask=mask, other=0.0).to(dtype).to(tl.float32)
        sin = tl.load(cos_sin_row + stride_cache_kind, mask=mask, other=0.0)
        sin = sin.to(dtype).to(tl.float32)
        grid_dependency_sync(PDL)
        base = token.to(tl.int64) * stride_token + head * (2 * HALF)
        x1 = tl.load(x_ptr + base + cols, mask=mask, other=0.0)
        x2 = tl.load(x_ptr + base + HALF + cols, mask=mask, other=0.0)
        # x * cos + rotate_half(x) * sin, each product and the sum rounded as PyTorch does.
        a1 = (x1.to(tl.float32) * cos).to(x1.dtype).to(tl.float32)
        b1 = (-x2.to(tl.float32) * sin).to(x1.dtype).to(tl.float32)
        a2 = (x2.to(tl.float32) * cos).to(x1.dtype).to(tl.float32)
        b2 = (x1.to(tl.float32) * sin).to(x1.dtype).to(tl.float32)
        out = out_ptr + (token.to(tl.int64) * num_heads + head) * (2 * HALF) + cols
        tl.store(out, (a1 + b1).to(x1.dtype), mask=mask)
        tl.store(out + HALF, (a2 + b2).to(x1.dtype), mask=mask)

    @triton.jit
    def silu_mul_kernel(x_ptr, out_ptr, stride_x, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr):
        grid_dependency_sync(PDL)
        row, block = tl.program_id(0), tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row.to(tl.int64) * stride_x + n_cols + cols, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
        out = (act * up.to(tl.float32)).to(gate.dtype)
        tl.store(out_ptr + row.to(tl.int64) * n_cols + cols, out, mask=mask)

    @triton.jit
    def qk_norm_rope_kernel(
        qkv_ptr, q_out_ptr, k_out_ptr, q_w_ptr, k_w_ptr, cos_sin_ptr, pos_ptr,
        num_heads, num_kv_heads, stride_token, stride_cache_kind, stride_cache_pos, eps,
        pool_pointers_ptr, layer, slots_ptr, num_slots,
        HAS_NORM: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr, HEADS: tl.constexpr,
        STORE: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        # One program per (token, block of HEADS heads) over q's heads then k's (adjacent in
        # qkv): a [HEADS, head_dim] tile, the token's position and cos/sin loaded once. (A
        # program per (token, head) left most lanes idle and made a prefill latency-bound.)
        # With STORE, the k rows also write their rotated K, and the V head after k's heads
        # in qkv, into the layer's KV pools at the token's slot (tokens < num_slots only); the
        # pools' addresses are read from the pointer table, as the kernel runs.
        token = tl.program_id(0)
        heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
        cols = tl.arange(0, BLOCK)
        half = cols < HALF
        is_q = heads < num_heads
        is_k = (heads >= num_heads) & (heads < num_heads + num_kv_heads)
        mask = (is_q | is_k)[:, None] & half[None, :]
        dtype = qkv_ptr.dtype.element_ty
        # Before the wait (tesela/core/pdl.py): the norm weights, the token's position (a batch
        # row, written before the forward) and its cos/sin, the pool addresses and its slot.
        # Only the qkv row, which the GEMM just before writes, is loaded after it.
        pos = tl.load(pos_ptr + token)
        cos_sin_row = cos_sin_ptr + pos.to(tl.int64) * stride_cache_pos + cols
        cos = tl.load(cos_sin_row, mask=half, other=0.0).to(dtype).to(tl.float32)[None, :]
        sin = tl.load(cos_sin_row + stride_cache_kind, mask=half, other=0.0)
        sin = sin.to(dtype).to(tl.float32)[None, :]
        if HAS_NORM:
            wq1 = tl.load(q_w_ptr + cols, mask=half, other=0.0).to(tl.float32)
            wq2 = tl.load(q_w_ptr + HALF + cols, mask=half, other=0.0).to(tl.float32)
            wk1 = tl.load(k_w_ptr + cols, mask=half, other=0.0).to(tl.float32)
            wk2 = tl.load(k_w_ptr + HALF + cols, mask=half, other=0.0).to(tl.float32)
            w1 = tl.where(is_q[:, None], wq1[None, :], wk1[None, :])
            w2 = tl.where(is_q[:, None], wq2[None, :], wk2[None, :])
        if STORE:
            stores = token < num_slots
            k_pool = tl.load(pool_pointers_ptr + 2 * layer, mask=stores, other=0)
            v_pool = tl.load(pool_pointers_ptr + 2 * layer + 1, mask=stores, other=0)
            slot = tl.load(slots_ptr + token, mask=stores, other=0).to(tl.int64)
        grid_dependency_sync(PDL)
        base = token.to(tl.int64) * stride_token + heads[:, None] * (2 * HALF) + cols[None, :]
        x1 = tl.load(qkv_ptr + base, mask=mask, other=0.0)
        x2 = tl.load(qkv_ptr + base + HALF, mask=mask, other=0.0)
        if STORE:
            kv_mask = mask & is_k[:, None] & stores
            v_in = qkv_ptr + base + num_kv_heads * (2 * HALF)  # k head -> its v head
            v1 = tl.load(v_in, mask=kv_mask, other=0.0)
            v2 = tl.load(v_in + HALF, mask=kv_mask, other=0.0)
        if HAS_NORM:  # per-head RMSNorm, rounded as RMSNorm rounds (see rmsnorm_kernel)
            x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
            variance = (tl.sum(x1f * x1f, axis=1) + tl.sum(x2f * x2f, axis=1)) / (2 * HALF)
            scale = tl.rsqrt(variance + eps)[:, None]
            x1 = (w1 * (x1f * scale).to(dtype).to(tl.float32)).to(dtype)
            x2 = (w2 * (x2f * scale).to(dtype).to(tl.float32)).to(dtype)
        a1 = (x1.to(tl.float32) * cos).to(dtype).to(tl.float32)
        b1 = (-x2.to(tl.float32) * sin).to(dtype).to(tl.float32)
        a2 = (x2.to(tl.float32) * cos).to(dtype).to(tl.float32)
        b2 = (x1.to(tl.float32) * sin).to(dtype).to(tl.float32)
        y1, y2 = (a1 + b1).to(dtype), (a2 + b2).to(dtype)
        q_rows = token.to(tl.int64) * num_heads + heads
        q_out = q_out_ptr + q_rows[:, None] * (2 * HALF) + cols[None, :]
        q_mask = mask & is_q[:, None]
        tl.store(q_out, y1, mask=q_mask)
        tl.store(q_out + HALF, y2, mask=q_mask)
        kv_heads = heads - num_heads
        k_rows = token.to(tl.int64) * num_kv_heads + kv_heads
        k_out = k_out_ptr + k_rows[:, None] * (2 * HALF) + cols[None, :]
        k_mask = mask & is_k[:, None]
        tl.store(k_out, y1, mask=k_mask)
        tl.store(k_out + HALF, y2, mask=k_mask)
        if STORE:  # noqa: SIM102  (a compile-time branch around a run-time one)
            if stores:
                row = slot * num_kv_heads * (2 * HALF) + kv_heads[:, None] * (2 * HALF)
                row = row + cols[None, :]
                k_dst = k_pool.to(qkv_ptr.dtype) + row
                v_dst = v_pool.to(qkv_ptr.dtype) + row
                tl.store(k_dst, y1, mask=kv_mask)
                tl.store(k_dst + HALF, y2, mask=kv_mask)
                tl.store(v_dst, v1, mask=kv_mask)
                tl.store(v_dst + HALF, v2, mask=kv_mask)

    return rmsnorm_kernel, rotary_kernel, silu_mul_kernel, qk_norm_rope_kernel


def _rms_norm(x, weight, eps, residual=None):
    """The kernel launch behind `rms_norm` (its docstring says what it computes)."""
    rmsnorm_kernel = _kernels()[0]
    n_cols = x.shape[-1]
    if x.dim() == 3:
        tokens, heads = x.shape[0], x.shape[1]
        stride_group, stride_row = x.stride(0), x.stride(1)
    else:
        tokens, heads = x.shape[0], 1
        stride_group, stride_row = x.stride(0), 0
    assert x.stride(-1) == 1
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(out) if residual is not None else None
    rows = tokens * heads
    if rows == 0:
        return out, new_residual
    rmsnorm_kernel[(rows,)](
        x, residual if residual is not None else x, new_residual if residual is not None else x,
        weight, out,
        heads, stride_group, stride_row,
        residual.stride(0) if residual is not None else 0, n_cols,
        n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=next_power_of_2(n_cols),
        num_warps=4 if n_cols <= 2048 else 8, **launch_kwargs(x.device, tokens),
    )  # fmt: skip
    return out, new_residual


def _rotary(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Neox-style rotary of x [tokens, heads, head_dim] (token rows may be strided); returns a
    contiguous [tokens, heads * head_dim]. cos_sin_cache: [2, positions, head_dim] fp32."""
    rotary_kernel = _kernels()[1]
    tokens, heads, dim = x.shape
    assert x.stride(2) == 1 and x.stride(1) == dim
    out = torch.empty((tokens, heads * dim), dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    rotary_kernel[(tokens, heads)](
        x, out, cos_sin_cache, positions,
        heads, x.stride(0), cos_sin_cache.stride(0), cos_sin_cache.stride(1),
        HALF=dim // 2, BLOCK=next_power_of_2(dim // 2), **launch_kwargs(x.device, tokens),
    )  # fmt: skip
    return out


def _qk_norm_rope(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    norm_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = 0.0,
    kv_store: KVStoreTarget | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The launch behind `qk_norm_rope` (which documents it)."""
    kernel = _kernels()[3]
    tokens = qkv.shape[0]
    head_dim = cos_sin_cache.shape[-1]
    assert qkv.stride(1) == 1 and qkv.shape[1] >= (num_heads + 2 * num_kv_heads) * head_dim
    q = torch.empty((tokens, num_heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((tokens, num_kv_heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return q, k
    q_weight, k_weight = norm_weights if norm_weights is not None else (qkv, qkv)
    if kv_store is None:
        store = (positions, 0, positions, 0)
    else:
        slots = kv_store.slots
        store = (kv_store.pointers, kv_store.layer, slots, min(slots.shape[0], tokens))
    heads = min(QK_HEADS, next_power_of_2(num_heads + num_kv_heads))
    kernel[(tokens, -(-(num_heads + num_kv_heads) // heads))](
        qkv, q, k, q_weight, k_weight, cos_sin_cache, positions,
        num_heads, num_kv_heads, qkv.stride(0), cos_sin_cache.stride(0), cos_sin_cache.stride(1),
        eps, *store,
        HAS_NORM=norm_weights is not None, HALF=head_dim // 2, BLOCK=next_power_of_2(head_dim // 2),
        HEADS=heads, STORE=kv_store is not None, **launch_kwargs(qkv.device, tokens),
    )  # fmt: skip
    return q, k


def _silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :n]) * x[:, n:] for x = [gate | up] of width 2n."""
    silu_mul_kernel = _kernels()[2]
    tokens, n = x.shape[0], x.shape[1] // 2
    assert x.stride(1) == 1
    out = torch.empty((tokens, n), dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    block = 1024
    silu_mul_kernel[(tokens, -(-n // block))](
        x, out, x.stride(0), n, BLOCK=block, **launch_kwargs(x.device, tokens)
    )
    return out


# ---- the public entry points: direct calls, or tesela:: custom ops while a trace records them


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm over the last dim. x: [tokens, hidden] or [tokens, heads, head_dim] (rows may be
    strided views). With `residual` ([tokens, hidden]) the norm is taken of residual + x, and
    that sum is returned as the new residual."""
    if not opaque_under_trace(x):
        return _rms_norm(x, weight, eps, residual)
    if residual is None:
        return torch.ops.tesela.rms_norm(x, weight, eps), None
    out, new_residual = torch.ops.tesela.add_rms_norm(x, residual, weight, eps)
    return out, new_residual


def rotary(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Neox-style rotary of x [tokens, heads, head_dim] (token rows may be strided); returns a
    contiguous [tokens, heads * head_dim]. cos_sin_cache: [2, positions, head_dim] fp32."""
    if opaque_under_trace(x):
        return torch.ops.tesela.rotary(x, positions, cos_sin_cache)
    return _rotary(x, positions, cos_sin_cache)


def qk_norm_rope(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    norm_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = 0.0,
    kv_store: KVStoreTarget | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k (Qwen3; skipped when `norm_weights` is None) and neox rotary,
    in one launch, read from the fused projection qkv = [q | k | v] ([tokens, width], rows may
    be strided). Returns contiguous q [tokens, heads * head_dim], k [tokens, kv_heads * head_dim]
    equal to `rms_norm` followed by `rotary` (up to the norm's summation order). With
    `kv_store` (the attention backend's `kv_store_target`) the same launch also writes the
    rotated K and the V of each token below `len(kv_store.slots)` into the KV pools, as the
    attention call's own store would (bit for bit); not under a trace."""
    if not opaque_under_trace(qkv):
        return _qk_norm_rope(
            qkv, positions, cos_sin_cache, num_heads, num_kv_heads, norm_weights, eps, kv_store
        )
    q_weight, k_weight = norm_weights if norm_weights is not None else (None, None)
    # A trace gets no store target; the CPU stand-in records the store with the op.
    store = (None, 0, None)
    if kv_store is not None:
        store = (kv_store.pointers, kv_store.layer, kv_store.slots)
    q, k = torch.ops.tesela.qk_norm_rope(
        qkv, positions, cos_sin_cache, num_heads, num_kv_heads, q_weight, k_weight, eps, *store
    )
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :n]) * x[:, n:] for x = [gate | up] of width 2n."""
    if opaque_under_trace(x):
        return torch.ops.tesela.silu_and_mul(x)
    return _silu_and_mul(x)


# The custom ops return fresh tensors (no aliasing, nothing mutated); each fake gives the real
# output's shape and (contiguous) strides so the trace's shapes match the kernel's.


@torch.library.custom_op("tesela::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms_norm(x, weight, eps)[0]


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("tesela::add_rms_norm", mutates_args=())
def _add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm(x, weight, eps, residual)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("tesela::rotary", mutates_args=())
def _rotary_op(
    x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> torch.Tensor:
    return _rotary(x, positions, cos_sin_cache)


@_rotary_op.register_fake
def _(x, positions, cos_sin_cache):
    return x.new_empty((x.shape[0], x.shape[1] * x.shape[2]))


# With a store (`kv_pointers`..., recorded by the CPU graph stand-in only) the op also writes the
# KV pools through the pointer table, which it does not declare: no trace ever passes a store.
@torch.library.custom_op("tesela::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    kv_pointers: torch.Tensor | None = None,
    kv_layer: int = 0,
    kv_slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    weights = (q_weight, k_weight) if q_weight is not None else None
    store = None if kv_pointers is None else KVStoreTarget(kv_pointers, kv_layer, kv_slots)
    return _qk_norm_rope(
        qkv, positions, cos_sin_cache, num_heads, num_kv_heads, weights, eps, store
    )


@_qk_norm_rope_op.register_fake
def _(
    qkv, positions, cos_sin_cache, num_heads, num_kv_heads, q_weight, k_weight, eps,
    kv_pointers=None, kv_layer=0, kv_slots=None,
):  # fmt: skip
    head_dim = cos_sin_cache.shape[-1]
    tokens = qkv.shape[0]
    return qkv.new_empty((tokens, num_heads * head_dim)), qkv.new_empty(
        (tokens, num_kv_heads * head_dim)
    )


@torch.library.custom_op("tesela::silu_and_mul", mutates_args=())
def _silu_and_mul_op(x: torch.Tensor) -> torch.Tensor:
    return _silu_and_mul(x)


@_silu_and_mul_op.register_fake
def _(x):
    return x.new_empty((x.shape[0], x.shape[1] // 2))
