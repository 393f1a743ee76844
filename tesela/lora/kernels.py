"""LoRA kernels: segmented Triton kernels (tiles: tesela/lora/tiles.py), the dense cuBLAS
path, and the torch reference.

For a target with slices j (q/k/v of `qkv_proj`, gate/up of `gate_up_proj`, one for the
others) and a token t served by adapter slot `slot`:

    shrink:  s[t, j, :]         = x[t] @ A[slot, j, :rank].T              (fp32)
    expand:  y[t, off_j:off_j+1] += scaling[slot] * s[t, j, :rank] @ B[slot, j, off_j:off_j+1, :rank].T

Three styles read the same persistent buffers of the per-batch LoRA state:
- `sgmv` (extend/mixed): programs own fixed blocks of BLOCK_M tokens and walk the segments
  (runs of consecutive tokens sharing an adapter) that overlap their block, so any number of
  segments is served and none is skipped. The shrink is split over K (`split_k` programs per
  block and slice, each writing its partial sums to its own plane of `s`; no atomics) so that a
  prefill fills the GPU instead of walking K=1024..3072 serially in a few dozen programs; the
  expand adds the planes up in order.
- `gather` (decode): one fused launch per target. Program (token, column block, slice) reads
  its slot from `token_slot`, loads its B and y columns, recomputes its token's s (A is 16 x K:
  small; K in steps of a few unrolled chunks whose loads are in flight together) and adds its
  columns of the delta. Half the launches of shrink + expand and no s buffer: at decode sizes
  a LoRA kernel costs its launch and memory latency, not its bytes.
- `dense` (cuBLAS, large extend/mixed launches; `dense_lora`): s = x @ A_all.T over every
  slot, times the per-token scale buffer (its own slot's columns and rank only), then
  y += s @ B_all (B_all block-diagonal over the slices: one GEMM). The policy (tesela/lora/policy.py) picks it.
For `sgmv` and `gather`, a token's sum order (K step, split planes) depends on the target's
shape alone (`LoRATiles.ORDER_FIELDS`), so its delta is bit-identical in any batch, eager or
replayed. For `dense`, a token's delta is as deterministic as the base model's cuBLAS GEMMs:
bit-identical at one token count (a replay and the eager forward over the same padded
buffers), within GEMM rounding across counts (cuBLAS may pick another algorithm for another
M). Launch shapes depend only on the (padded) token count and the target's shape, never on the
batch: a graph captured at one size is right for every batch replayed at that size. Tokens of
the base model and padding carry slot -1 and add nothing (the Triton kernels skip them; the
dense scale buffer zeroes their s); a slot's rank masks its weights, so a smaller adapter in a
reused slot never reads the previous one's rows.
"""

from __future__ import annotations

import functools

import torch

from tesela.lora.policy import DENSE
from tesela.lora.tiles import GATHER, SGMV, LoRATiles, choose_tiles, rank_block


def launches_per_target(style: str, num_slices: int) -> int:
    """Kernel launches one LoRA target costs: the fused gather kernel; shrink + expand; or
    the dense shrink GEMM, the scale multiply and the expand GEMM (`num_slices`: kept for
    styles whose count depends on it)."""
    return {GATHER: 1, SGMV: 2, DENSE: 3}[style]


def lora_weights(
    slots: int,
    slice_offsets: tuple[int, ...],
    max_rank: int,
    in_features: int,
    block_diagonal: bool = True,
    **tensor_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed stacked weights, as the views every style indexes: a [slots, slices, rank, in]
    and b [slots, slices, out, rank] (slice j's B in b[:, j]'s rows of slice j).

    Storages: A as [slices, slots, rank, in] (one [slices*slots*rank, in] matrix for the dense
    shrink). B with output columns innermost (a rank row of a slot: `out` contiguous values,
    so the Triton kernels' column tiles load coalesced), and `block_diagonal` (what the dense
    expand needs) as [slices, slots, rank, out], zero outside each slice's columns: one
    [slices*slots*rank, out] matrix, `slices` times the memory; else [slots, rank, out] once,
    every slice's view on it (stride 0: the kernels read only their slice's columns). Write b
    one slice at a time (b[slot, j]): its views overlap."""
    num_slices, out_features = len(slice_offsets) - 1, slice_offsets[-1]
    a = torch.zeros(num_slices, slots, max_rank, in_features, **tensor_kwargs)
    if block_diagonal:
        b = torch.zeros(num_slices, slots, max_rank, out_features, **tensor_kwargs)
        return a.transpose(0, 1), b.permute(1, 0, 3, 2)
    b = torch.zeros(slots, max_rank, out_features, **tensor_kwargs).transpose(1, 2)
    return a.transpose(0, 1), b.unsqueeze(1).expand(slots, num_slices, out_features, max_rank)


def zero_other_slices(b: torch.Tensor, slice_offsets: tuple[int, ...]) -> None:
    """Zero b[:, j] outside slice j's rows (the block-diagonal form the dense expand needs;
    the Triton kernels never read there)."""
    for j in range(b.shape[1]):
        b[:, j, : slice_offsets[j]] = 0
        b[:, j, slice_offsets[j + 1] :] = 0


def dense_lora(
    x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_scale: torch.Tensor
) -> None:
    """y += LoRA(x) with cuBLAS (a, b: views from `lora_weights`; x/y may be padded): a shrink
    GEMM for every slot and slice, the scale multiply, one expand GEMM accumulating into y.

    token_scale [>= tokens, slots * rank] (fp32, planned per batch, tesela/lora/state.py) is a
    token's slot scaling on its own slot's columns below that slot's rank, zero elsewhere: so
    a token never sees another slot's A or B (their products are exact zeros), and base and
    padding rows get an exact zero delta (y unchanged). Needs finite weights in every slot
    and B zero outside each slice's rows (the manager keeps both)."""
    slots, num_slices, max_rank, in_features = a.shape
    columns, num_tokens = slots * max_rank, x.shape[0]
    assert a.transpose(0, 1).is_contiguous() and b.permute(1, 0, 3, 2).is_contiguous()
    a_all = a.transpose(0, 1).view(num_slices * columns, in_features)
    b_all = b.permute(1, 0, 3, 2).view(num_slices * columns, b.shape[2])
    s = x @ a_all.T  # [tokens, slices * slots * rank]: every slot's shrink
    s.view(num_tokens, num_slices, columns).mul_(token_scale[:num_tokens, None, :])
    y.addmm_(s, b_all)


def apply_lora(x, y, a, b, slice_offsets, host_offsets, state, style: str) -> None:
    """The Triton backend's entry: the Triton kernels of `style`, or the dense GEMMs."""
    if style == DENSE:
        dense_lora(x, y, a, b, state.token_scale)
        return
    max_size = max(hi - lo for lo, hi in zip(host_offsets[:-1], host_offsets[1:], strict=True))
    triton_lora(x, y, a, b, slice_offsets, max_size, state, style)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def shrink_sgmv(
        x_ptr, a_ptr, s_ptr, token_seg_ptr, seg_start_ptr, seg_slot_ptr, ranks_ptr,
        num_tokens, K, k_per_split, stride_xm, stride_a_slot, stride_a_slice, stride_a_rank,
        stride_s_split, stride_sm,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        pid_m, j, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        m_start = pid_m * BLOCK_M
        m_end = tl.minimum(m_start + BLOCK_M, num_tokens)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        rows = m_start + tl.arange(0, BLOCK_M)
        r = tl.arange(0, BLOCK_R)
        s_base = s_ptr + pid_k.to(tl.int64) * stride_s_split
        seg = tl.load(token_seg_ptr + m_start)
        seg_lo = tl.load(seg_start_ptr + seg)
        while seg_lo < m_end:
            seg_hi = tl.load(seg_start_ptr + seg + 1)
            slot = tl.load(seg_slot_ptr + seg)
            if slot >= 0:
                rank = tl.load(ranks_ptr + slot)
                row_mask = (rows >= seg_lo) & (rows < seg_hi) & (rows < m_end)
                a_base = a_ptr + slot.to(tl.int64) * stride_a_slot + j * stride_a_slice
                acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for k0 in range(k_lo, k_hi, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    xt = tl.load(
                        x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
                        mask=row_mask[:, None] & (ks < k_hi)[None, :], other=0.0,
                    )  # fmt: skip
                    at = tl.load(
                        a_base + r[None, :] * stride_a_rank + ks[:, None],
                        mask=(r < rank)[None, :] & (ks < k_hi)[:, None], other=0.0,
                    )  # fmt: skip
                    if IEEE:
                        acc += tl.dot(xt, at, input_precision="ieee")
                    else:
                        acc += tl.dot(xt, at)
                s_offs = rows[:, None].to(tl.int64) * stride_sm + j * BLOCK_R + r[None, :]
                tl.store(s_base + s_offs, acc, mask=row_mask[:, None])
            seg += 1
            seg_lo = seg_hi

    @triton.jit
    def expand_sgmv(
        s_ptr, b_ptr, y_ptr, slice_off_ptr, token_seg_ptr, seg_start_ptr, seg_slot_ptr,
        ranks_ptr, scalings_ptr,
        num_tokens, stride_s_split, stride_sm, stride_b_slot, stride_b_slice, stride_b_row,
        stride_b_rank, stride_ym,
        SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_n, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offset = tl.load(slice_off_ptr + j)
        size = tl.load(slice_off_ptr + j + 1) - offset
        m_start = pid_m * BLOCK_M
        m_end = tl.minimum(m_start + BLOCK_M, num_tokens)
        if pid_n * BLOCK_N < size:
            rows = m_start + tl.arange(0, BLOCK_M)
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            col_mask = cols < size
            r = tl.arange(0, BLOCK_R)
            seg = tl.load(token_seg_ptr + m_start)
            seg_lo = tl.load(seg_start_ptr + seg)
            while seg_lo < m_end:
                seg_hi = tl.load(seg_start_ptr + seg + 1)
                slot = tl.load(seg_slot_ptr + seg)
                if slot >= 0:
                    rank = tl.load(ranks_ptr + slot)
                    scaling = tl.load(scalings_ptr + slot)
                    row_mask = (rows >= seg_lo) & (rows < seg_hi) & (rows < m_end)
                    s_offs = rows[:, None].to(tl.int64) * stride_sm + j * BLOCK_R + r[None, :]
                    st = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                    for split in tl.static_range(SPLIT_K):  # the shrink's K planes, in order
                        st += tl.load(
                            s_ptr + split * stride_s_split + s_offs,
                            mask=row_mask[:, None], other=0.0,
                        )  # fmt: skip
                    b_offs = (
                        slot.to(tl.int64) * stride_b_slot
                        + j * stride_b_slice
                        + (offset + cols)[None, :].to(tl.int64) * stride_b_row
                        + r[:, None] * stride_b_rank
                    )
                    bt = tl.load(
                        b_ptr + b_offs, mask=(r < rank)[:, None] & col_mask[None, :], other=0.0
                    )
                    if IEEE:
                        delta = tl.dot(st, bt.to(tl.float32), input_precision="ieee")
                    else:
                        delta = tl.dot(st.to(bt.dtype), bt)
                    y_offs = rows[:, None].to(tl.int64) * stride_ym + (offset + cols)[None, :]
                    mask = row_mask[:, None] & col_mask[None, :]
                    y = tl.load(y_ptr + y_offs, mask=mask, other=0.0)
                    out = y.to(tl.float32) + delta * scaling
                    tl.store(y_ptr + y_offs, out.to(y.dtype), mask=mask)
                seg += 1
                seg_lo = seg_hi

    @triton.jit
    def lora_gather(
        x_ptr, a_ptr, b_ptr, y_ptr, slice_off_ptr, token_slot_ptr, ranks_ptr, scalings_ptr,
        K, stride_xm, stride_a_slot, stride_a_slice, stride_a_rank, stride_b_slot,
        stride_b_slice, stride_b_row, stride_b_rank, stride_ym,
        K_UNROLL: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        t, pid_n, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        slot = tl.load(token_slot_ptr + t)
        offset = tl.load(slice_off_ptr + j)
        size = tl.load(slice_off_ptr + j + 1) - offset
        if (slot >= 0) & (pid_n * BLOCK_N < size):
            rank = tl.load(ranks_ptr + slot)
            scaling = tl.load(scalings_ptr + slot)
            r = tl.arange(0, BLOCK_R)
            # B and y first: their loads depend only on the slot, so they are in flight with
            # the shrink's (the compiler does not move loads across the shrink's reduction).
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            col_mask = cols < size
            b_offs = (
                slot.to(tl.int64) * stride_b_slot
                + j * stride_b_slice
                + (offset + cols)[:, None].to(tl.int64) * stride_b_row
                + r[None, :] * stride_b_rank
            )
            bt = tl.load(b_ptr + b_offs, mask=col_mask[:, None] & (r < rank)[None, :], other=0.0)
            y_offs = t.to(tl.int64) * stride_ym + offset + cols
            y = tl.load(y_ptr + y_offs, mask=col_mask, other=0.0)
            # Shrink: K_UNROLL chunks per step are unrolled, so their loads issue back to back
            # (one memory round trip per step, not per chunk; at most ~2K elements of A in
            # registers); one cross-thread sum at the end.
            a_base = a_ptr + slot.to(tl.int64) * stride_a_slot + j * stride_a_slice
            x_base = x_ptr + t.to(tl.int64) * stride_xm
            acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, K_UNROLL * BLOCK_K):
                for c in tl.static_range(K_UNROLL):
                    ks = k0 + c * BLOCK_K + tl.arange(0, BLOCK_K)
                    xk = tl.load(x_base + ks, mask=ks < K, other=0.0)
                    at = tl.load(
                        a_base + r[:, None] * stride_a_rank + ks[None, :],
                        mask=(r < rank)[:, None] & (ks < K)[None, :], other=0.0,
                    )  # fmt: skip
                    acc += at.to(tl.float32) * xk.to(tl.float32)[None, :]
            s = tl.sum(acc, axis=1)
            # Expand: this program's BLOCK_N columns of the slice.
            delta = tl.sum(bt.to(tl.float32) * s[None, :], axis=1) * scaling
            tl.store(y_ptr + y_offs, (y.to(tl.float32) + delta).to(y.dtype), mask=col_mask)

    return shrink_sgmv, expand_sgmv, lora_gather


def triton_lora(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    slice_offsets: torch.Tensor,
    max_slice_size: int,
    state,
    style: str,
    tiles: LoRATiles | None = None,
) -> None:
    """y += LoRA(x) for every token of x (x/y may be padded past the batch's tokens).

    a: [slots, slices, max_rank, in]; b: [slots, slices, out, max_rank] (slice j's B in its
    rows); `state` holds the persistent
    per-batch buffers (token_slot, token_seg, seg_start, seg_slot, ranks, scalings); `tiles`
    overrides the tile choice (tests)."""
    num_tokens, K = x.shape
    num_slices, block_r = a.shape[1], rank_block(a.shape[2])
    assert a.stride(3) == 1 and x.stride(1) == 1 and y.stride(1) == 1  # b: any strides
    assert style in (SGMV, GATHER), style
    tiles = tiles or choose_tiles(style, num_tokens, K, max_slice_size, num_slices, block_r, x)
    if style == SGMV:
        _launch_sgmv(x, y, a, b, slice_offsets, max_slice_size, state, tiles)
        return
    _, _, lora_gather = _kernels()
    grid = (num_tokens, -(-max_slice_size // tiles.block_n), num_slices)
    lora_gather[grid](
        x, a, b, y, slice_offsets, state.token_slot, state.ranks, state.scalings,
        K, x.stride(0), a.stride(0), a.stride(1), a.stride(2), *b.stride(), y.stride(0),
        K_UNROLL=tiles.k_unroll(K), BLOCK_K=tiles.block_k, BLOCK_N=tiles.block_n,
        BLOCK_R=block_r, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip


def _launch_sgmv(x, y, a, b, slice_offsets, max_slice_size, state, tiles: LoRATiles) -> None:
    """Shrink into `split_k` fp32 planes of s (each (block, slice, split) program owns its K
    range), then expand, summing the planes in a fixed order."""
    shrink_sgmv, expand_sgmv, _ = _kernels()
    num_tokens, K = x.shape
    num_slices, block_r = a.shape[1], rank_block(a.shape[2])
    split_k = tiles.num_splits(K)
    s = torch.empty(split_k, num_tokens, num_slices * block_r, dtype=torch.float32, device=x.device)
    m_blocks = -(-num_tokens // tiles.block_m)
    ieee = x.dtype == torch.float32
    shrink_sgmv[(m_blocks, num_slices, split_k)](
        x, a, s, state.token_seg, state.seg_start, state.seg_slot, state.ranks,
        num_tokens, K, tiles.k_per_split(K), x.stride(0), a.stride(0), a.stride(1),
        a.stride(2), s.stride(0), s.stride(1),
        BLOCK_M=tiles.block_m, BLOCK_K=tiles.block_k, BLOCK_R=block_r, IEEE=ieee,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    expand_sgmv[(m_blocks, -(-max_slice_size // tiles.block_n), num_slices)](
        s, b, y, slice_offsets, state.token_seg, state.seg_start, state.seg_slot,
        state.ranks, state.scalings,
        num_tokens, s.stride(0), s.stride(1), *b.stride(), y.stride(0),
        SPLIT_K=split_k, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_R=block_r,
        IEEE=ieee, num_warps=tiles.expand_warps, num_stages=tiles.num_stages,
    )  # fmt: skip


def torch_lora(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    slice_offsets: tuple[int, ...],
    segments: list[tuple[int, int, int]],
    ranks: list[int],
    scalings: list[float],
) -> None:
    """The torch path (CPU, eager): y += LoRA(x) segment by segment, from host-side lists.

    `segments` are (start, end, slot) runs of tokens; slot -1 (the base model) adds nothing."""
    for start, end, slot in segments:
        if slot < 0:
            continue
        rank = ranks[slot]
        rows = x[start:end]
        for j in range(a.shape[1]):
            lo, hi = slice_offsets[j], slice_offsets[j + 1]
            shrunk = rows @ a[slot, j, :rank].T
            y[start:end, lo:hi] += scalings[slot] * (shrunk @ b[slot, j, lo:hi, :rank].T)


def reference_lora_delta(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    slice_offsets: tuple[int, ...],
    token_slot: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
) -> torch.Tensor:
    """The delta each token's adapter adds, computed densely in fp64 (for tests)."""
    out = torch.zeros(x.shape[0], b.shape[2], dtype=torch.float64)
    for t, slot in enumerate(token_slot.tolist()):
        if slot < 0:
            continue
        rank = int(ranks[slot])
        for j in range(a.shape[1]):
            lo, hi = slice_offsets[j], slice_offsets[j + 1]
            shrunk = x[t].double() @ a[slot, j, :rank].double().T
            out[t, lo:hi] = float(scalings[slot]) * (shrunk @ b[slot, j, lo:hi, :rank].double().T)
    return out
