"""Small-M linear layers (M <= 16 tokens, the decode batch): two Triton kernels, each used
only where a tuning run measured it faster than cuBLAS and the unfused ops.

At batch 1-16 a linear layer is a GEMV: it reads the whole weight once and does almost no math,
so its time is the weight's bytes over the bandwidth it reaches.

- `gemv_kernel` streams: each program takes BLOCK_N full weight rows (all of K), loads its
  first weight tile before the PDL wait (at 1-2 tokens that tile may span all of K) and each
  later one an iteration ahead. It serves the small weights (K up to a few thousand, a few MB),
  where the weight's first bytes arriving early matter most.
- `gemv_split_kernel` (plain GEMMs only) puts the tokens through tensor cores (M padded to 16)
  so that Triton pipelines the weight loads, num_stages - 1 tiles in flight per program, and
  splits K over up to 8 programs per row tile where N alone gives too few programs: each
  leaves fp32 partial sums, and the row tile's last program to arrive (an acq_rel count per
  tile, put back to 0 by that program) adds them in split order. On H200 it serves the large
  weights at 1-2 tokens (llama-3.2-1b's down_proj at batch 1 takes 11.3 us against cuBLAS's
  13.6, split-K plus a separate reduce kernel; its gate_up 18.4 against 19.1) and most plain
  GEMMs at 4-16 tokens, where the streaming kernel's register tiles hold few weights.

In both, each output row's sum runs in a fixed order that depends on the bucket's config
alone, so a token's row does not depend on the rest of the batch and the result does not
depend on scheduling.

The streaming kernel can also do the small op before its GEMM while it loads its input (a
"prologue"), saving a launch and a round trip of the activation: `silu` (the MLP's silu(gate) *
up before down_proj) and `norm` (the residual add + RMSNorm before qkv_proj and gate_up_proj).
Each rounds exactly where the unfused kernels of tesela/layers/fused.py round, so the two agree
up to the norm's summation order.

Which kernel serves a call is data, not a guess: `gemv_table.json` beside this file maps
device name -> dtype -> prologue -> "N,K" -> M bucket (1, 2, 4, 8, 16) -> kernel config, and
holds only the cases where the Triton kernel was correct and beat the unfused path (cuBLAS,
plus the separate norm or activation kernel) on that device. It is written by
`python -m tesela.tune.gemv` on the GPU and checked in. Anything not in the table (a
shape, a device, a dtype, M > 16, CPU, torch.compile) runs the unfused path.

Traced with opaque fused ops (tesela/layers/fused.py), `linear`, `silu_linear` and
`norm_linear` each become one `tesela::` custom op whose body makes the whole choice above at
run time: the trace never branches on the symbolic token count (no guard, no recompile at 16).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tesela.core.pdl import grid_dependency_sync, launch_kwargs
from tesela.core.scratch import SPLIT_K_ARRIVALS
from tesela.layers import fused
from tesela.layers.norm import add_rms_norm, rms_norm

TABLE_PATH = Path(__file__).with_name("gemv_table.json")
M_BUCKETS = (1, 2, 4, 8, 16)
MAX_M = M_BUCKETS[-1]


def m_bucket(m: int) -> int:
    return next(b for b in M_BUCKETS if b >= m)


PROLOGUES = ("none", "silu", "norm")  # what the kernel does to its input as it loads it


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, res_ptr, res_out_ptr, norm_w_ptr,
        M, N, K, stride_xm, stride_wn, stride_om, stride_rm, eps,
        PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
        USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        ms = tl.arange(0, BLOCK_M)
        ks = tl.arange(0, BLOCK_K)
        row_mask, m_mask = rows < N, ms < M
        w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + ks[None, :]
        # The first weight tile is loaded before the wait: no kernel writes weights, so under
        # PDL it streams in while the previous kernel finishes (all of this program's weights,
        # where the tuned BLOCK_K spans K). Each later tile is loaded one iteration ahead (past
        # K the load is masked off).
        w = tl.load(w_ptrs, mask=row_mask[:, None] & (ks < K)[None, :], other=0.0)
        grid_dependency_sync(PDL)
        x_ptrs = x_ptr + ms[:, None] * stride_xm + ks[None, :]
        r_ptrs = res_ptr + ms[:, None] * stride_rm + ks[None, :]
        if PROLOGUE == 2:  # RMSNorm of (x + residual): its variance first (x is in L2)
            sq = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask = m_mask[:, None] & ((k0 + ks) < K)[None, :]
                h = tl.load(x_ptrs + k0, mask=mask, other=0.0)
                if HAS_RESIDUAL:  # residual + x rounded, as rmsnorm_kernel rounds it
                    r = tl.load(r_ptrs + k0, mask=mask, other=0.0)
                    h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
                    out_res = res_out_ptr + ms[:, None] * K + k0 + ks[None, :]
                    tl.store(out_res, h, mask=mask & (pid == 0))  # one program writes it
                sq += h.to(tl.float32) * h.to(tl.float32)
            rstd = tl.rsqrt(tl.sum(sq, axis=1) / K + eps)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + ks) < K
            x_mask = m_mask[:, None] & k_mask[None, :]
            x = tl.load(x_ptrs + k0, mask=x_mask, other=0.0)
            if PROLOGUE == 1:  # x = [gate | up]: silu(gate) * up, rounded as silu_mul_kernel
                up = tl.load(x_ptrs + K + k0, mask=x_mask, other=0.0)
                gate = x.to(tl.float32)
                act = (gate / (1.0 + tl.exp(-gate))).to(x.dtype).to(tl.float32)
                x = (act * up.to(tl.float32)).to(x.dtype)
            elif PROLOGUE == 2:
                if HAS_RESIDUAL:
                    r = tl.load(r_ptrs + k0, mask=x_mask, other=0.0)
                    x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
                y = (x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32)
                norm_w = tl.load(norm_w_ptr + k0 + ks, mask=k_mask, other=0.0)
                x = (norm_w.to(tl.float32)[None, :] * y).to(x.dtype)
            if USE_DOT:  # tensor cores (M padded to 16): worth it from a few tokens up
                acc += tl.dot(x, tl.trans(w))
            else:
                prod = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
                acc += tl.sum(prod, axis=2)
            next_k = k0 + BLOCK_K + ks
            w = tl.load(w_ptrs + k0 + BLOCK_K, mask=row_mask[:, None] & (next_k < K)[None, :])
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + ms[:, None] * stride_om + rows[None, :]
        out_mask = m_mask[:, None] & row_mask[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def gemv_split_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, partial_ptr, arrived_ptr,
        M, N, K, stride_xm, stride_wn, stride_om, k_per_split,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        tile, split = pid // SPLIT_K, pid % SPLIT_K
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        ms = tl.arange(0, BLOCK_M)
        ks = tl.arange(0, BLOCK_K)
        row_mask, m_mask = rows < N, ms < M
        k_lo = split * k_per_split  # whole BLOCK_K steps: K is a multiple of SPLIT_K * BLOCK_K
        w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + k_lo + ks[None, :]
        w = tl.load(w_ptrs, mask=row_mask[:, None], other=0.0)  # before the wait
        grid_dependency_sync(PDL)
        x_ptrs = x_ptr + ms[:, None] * stride_xm + k_lo + ks[None, :]
        acc = tl.dot(tl.load(x_ptrs, mask=m_mask[:, None], other=0.0), tl.trans(w))
        # The rest of this program's K: Triton pipelines these loads (num_stages deep), so
        # several weight tiles are in flight per program.
        for k0 in range(BLOCK_K, k_per_split, BLOCK_K):
            w = tl.load(w_ptrs + k0, mask=row_mask[:, None], other=0.0)
            x = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
        out_mask = m_mask[:, None] & row_mask[None, :]
        if SPLIT_K > 1:
            # Each split leaves its partial sums; the row tile's last program to arrive adds
            # them in split order (the same sum whichever arrives last) and stores y.
            part_offs = ms[:, None] * N + rows[None, :]
            tl.store(partial_ptr + split * M * N + part_offs, acc, mask=out_mask)
            tl.debug_barrier()  # every thread's partial stored before the release below
            last = tl.atomic_add(arrived_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1
            if last:
                tl.debug_barrier()
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for i in tl.static_range(SPLIT_K):
                    part = tl.load(
                        partial_ptr + i * M * N + part_offs, mask=out_mask, cache_modifier=".cg"
                    )
                    acc += part
                tl.store(arrived_ptr + tile, 0)  # ready for the next launch
        else:
            last = True
        if last:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
            out_ptrs = out_ptr + ms[:, None] * stride_om + rows[None, :]
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    return gemv_kernel, gemv_split_kernel


def _check(x: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[int, int]:
    m, n = x.shape[0], weight.shape[0]
    if m > MAX_M or weight.shape[1] != k or x.stride(-1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"gemv serves [<= {MAX_M}, K] @ [N, K]^T row-major, got {x.shape}")
    return m, n


def _launch_split(x, weight, bias, config) -> torch.Tensor:
    m, k = x.shape
    n = _check(x, weight, k)[1]
    splits, block_n = config["split_k"], config["block_n"]
    if k % (splits * config["block_k"]) != 0:
        raise ValueError(f"K={k} is not a multiple of split_k * block_k in {config}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    row_tiles = -(-n // block_n)
    if splits > 1:  # each split's partial sums; the arrival counts shared on the device
        partials = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
        arrived = SPLIT_K_ARRIVALS.get(x.device, row_tiles)
    else:
        partials = arrived = out  # unused
    _kernels()[1][(row_tiles * splits,)](
        x, weight, bias if bias is not None else weight, out, partials, arrived,
        m, n, k, x.stride(0), weight.stride(0), out.stride(0), k // splits,
        HAS_BIAS=bias is not None, BLOCK_M=max(m_bucket(m), 16), BLOCK_N=block_n,
        BLOCK_K=config["block_k"], SPLIT_K=splits,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
        **launch_kwargs(x.device, m),
    )  # fmt: skip
    return out


def _launch(x, weight, bias, config, prologue, k, residual=None, norm_weight=None, eps=0.0):
    m, n = _check(x, weight, k)
    if "split_k" in config:
        raise ValueError(f"the split kernel has no {prologue!r} prologue: {config}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    new_residual = (
        torch.empty((m, k), dtype=x.dtype, device=x.device) if residual is not None else None
    )
    if m == 0:
        return out, new_residual
    bucket = m_bucket(m)
    block_m = max(bucket, 16) if config["use_dot"] else bucket
    grid = (-(-n // config["block_n"]),)
    _kernels()[0][grid](
        x, weight, bias if bias is not None else weight, out,
        residual if residual is not None else x,
        new_residual if new_residual is not None else x,
        norm_weight if norm_weight is not None else weight,
        m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        residual.stride(0) if residual is not None else 0, eps,
        PROLOGUE=PROLOGUES.index(prologue), HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None, USE_DOT=config["use_dot"],
        BLOCK_M=block_m, BLOCK_N=config["block_n"], BLOCK_K=config["block_k"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
        **launch_kwargs(x.device, m),
    )  # fmt: skip
    return out, new_residual


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: dict):
    """x [M, K] @ weight[N, K]^T (+ bias) with the Triton kernel and `config` (block_n,
    block_k, use_dot, num_warps, num_stages; with `split_k`, the split kernel)."""
    if "split_k" in config:
        return _launch_split(x, weight, bias, config)
    return _launch(x, weight, bias, config, "none", x.shape[-1])[0]


def gemv_silu(gate_up: torch.Tensor, weight: torch.Tensor, bias, config: dict) -> torch.Tensor:
    """silu(gate) * up of gate_up = [gate | up] ([M, 2K]), times weight [N, K]^T: the MLP's
    activation done while the down projection loads its input."""
    return _launch(gate_up, weight, bias, config, "silu", gate_up.shape[-1] // 2)[0]


def gemv_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(residual + x) @ weight^T, and residual + x (the new residual stream): the
    residual add and norm done while the projection loads its input."""
    out, new_residual = _launch(
        x, weight, bias, config, "norm", x.shape[-1], residual, norm_weight, eps
    )
    return out, new_residual if new_residual is not None else x


@functools.cache
def _device_table(device_name: str, dtype: str, path: Path = TABLE_PATH) -> dict:
    """{(prologue, N, K, bucket): config} for this device and dtype; empty when not tuned."""
    if not path.is_file():
        return {}
    table = json.loads(path.read_text()).get(device_name, {}).get(dtype, {})
    result = {}
    for prologue, shapes in table.items():
        if prologue not in PROLOGUES:
            raise ValueError(f"{path}: unknown prologue {prologue!r} (expected one of {PROLOGUES})")
        for shape, buckets in shapes.items():
            n, k = (int(v) for v in shape.split(","))
            for bucket, config in buckets.items():
                result[(prologue, n, k, int(bucket))] = config
    return result


def table_kernels(device_name: str, dtype: str = "bfloat16") -> dict:
    """(prologue, N, K) -> {kernel: M buckets} of the tuned table on this device, where kernel
    is "streaming" or "split-K S" (S programs per row tile): what `tesela doctor` shows. A
    bucket not listed runs the unfused path (cuBLAS, plus the separate norm or SiLU kernel)."""
    kernels: dict = {}
    for (prologue, n, k, bucket), config in _device_table(device_name, dtype).items():
        split = config.get("split_k")
        kind = "streaming" if split is None else f"split-K {split}"
        kernels.setdefault((prologue, n, k), {}).setdefault(kind, []).append(bucket)
    return {key: {kind: sorted(b) for kind, b in found.items()} for key, found in kernels.items()}


@functools.cache
def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type  # kernels on CPU (TRITON_INTERPRET tests): no table entry
    return torch.cuda.get_device_name(device.index or 0)


def lookup(x: torch.Tensor, weight: torch.Tensor, prologue: str = "none") -> dict | None:
    """The tuned Triton config for this call, or None for the unfused ops and cuBLAS."""
    # fused_enabled first: under torch.compile it is False, and a size test before it would
    # put a guard on the symbolic batch size (a recompile at 16 tokens).
    if not fused.fused_enabled(x) or x.dim() != 2 or not 0 < x.shape[0] <= MAX_M:
        return None
    dtype = str(x.dtype).removeprefix("torch.")
    table = _device_table(_device_name(x.device), dtype)
    return table.get((prologue, weight.shape[0], weight.shape[1], m_bucket(x.shape[0])))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if fused.opaque_under_trace(x):
        return torch.ops.tesela.linear(x, weight, bias)
    return _linear(x, weight, bias)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    config = lookup(x, weight)
    if config is None:
        return F.linear(x, weight, bias)
    return gemv(x, weight, bias, config)


def _has_lora(proj) -> bool:
    # A LoRA-enabled projection (Linear.attach_lora) runs through its module, whose forward adds
    # the adapter's delta; its input must exist for the adapter's shrink, so no norm or
    # activation is folded into its GEMM.
    return getattr(proj, "lora_offsets", None) is not None


def silu_linear(gate_up: torch.Tensor, down_proj) -> torch.Tensor:
    """down_proj(silu(gate) * up): one kernel where tuned, else the fused activation + GEMM.
    `down_proj` is a tesela Linear (its forward is `linear`, plus the adapter when LoRA is on)."""
    if _has_lora(down_proj):  # through the module, which adds the adapter's delta
        if fused.fused_enabled(gate_up):
            return down_proj(fused.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return down_proj(F.silu(gate) * up)
    if fused.opaque_under_trace(gate_up):
        return torch.ops.tesela.silu_linear(gate_up, down_proj.weight, down_proj.bias)
    return _silu_linear(gate_up, down_proj.weight, down_proj.bias)


def _silu_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    config = lookup(gate_up, weight, "silu")
    if config is not None:
        return gemv_silu(gate_up, weight, bias, config)
    if fused.fused_enabled(gate_up):
        return linear(fused.silu_and_mul(gate_up), weight, bias)
    gate, up = gate_up.chunk(2, dim=-1)
    return linear(F.silu(gate) * up, weight, bias)


def norm_linear(
    x: torch.Tensor, residual: torch.Tensor | None, norm, proj
) -> tuple[torch.Tensor, torch.Tensor]:
    """(proj(norm(residual + x)), residual + x); with no residual yet, x is the residual.
    One kernel where tuned, else the fused add + norm and then the GEMM. `norm` is an RMSNorm
    and `proj` a tesela Linear."""
    if _has_lora(proj):  # through the module, which adds the adapter's delta
        if residual is None:
            return proj(norm(x)), x
        normed, residual = norm.add_and_norm(x, residual)
        return proj(normed), residual
    args = (norm.weight, norm.eps, proj.weight, proj.bias)
    if not fused.opaque_under_trace(x):
        return _norm_linear(x, residual, *args)
    if residual is None:  # the op returns fresh tensors only: x is passed through here
        return torch.ops.tesela.norm_linear(x, *args), x
    out, new_residual = torch.ops.tesela.add_norm_linear(x, residual, *args)
    return out, new_residual


def _norm_linear(x, residual, norm_weight, eps, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    config = lookup(x, weight, "norm")
    if config is not None:
        return gemv_norm(x, residual, norm_weight, eps, weight, bias, config)
    if residual is None:
        return linear(rms_norm(x, norm_weight, eps), weight, bias), x
    normed, residual = add_rms_norm(x, residual, norm_weight, eps)
    return linear(normed, weight, bias), residual


# ---- the custom ops a trace records (fresh outputs, nothing mutated; fakes give the shapes)


@torch.library.custom_op("tesela::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _linear(x, weight, bias)


@_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("tesela::silu_linear", mutates_args=())
def _silu_linear_op(
    gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return _silu_linear(gate_up, weight, bias)


@_silu_linear_op.register_fake
def _(gate_up, weight, bias):
    return gate_up.new_empty((gate_up.shape[0], weight.shape[0]))


@torch.library.custom_op("tesela::norm_linear", mutates_args=())
def _norm_linear_op(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return _norm_linear(x, None, norm_weight, eps, weight, bias)[0]


@_norm_linear_op.register_fake
def _(x, norm_weight, eps, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("tesela::add_norm_linear", mutates_args=())
def _add_norm_linear_op(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm_linear(x, residual, norm_weight, eps, weight, bias)


@_add_norm_linear_op.register_fake
def _(x, residual, norm_weight, eps, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty(x.shape)
