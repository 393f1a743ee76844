"""Segmented LoRA kernels in Triton (tiles: tesela/lora/tiles.py), and the torch reference.

For a target with slices j (q/k/v of `qkv_proj`, gate/up of `gate_up_proj`, one for the
others) and a token t served by adapter slot `slot`:

    shrink:  s[t, j, :]         = x[t] @ A[slot, j, :rank].T              (fp32)
    expand:  y[t, off_j:off_j+1] += scaling[slot] * s[t, j, :rank] @ B[slot, off_j:off_j+1, :rank].T

Two styles read the same persistent buffers of the per-batch LoRA state:
- `sgmv` (extend/mixed): programs own fixed blocks of BLOCK_M tokens and walk the segments
  (runs of consecutive tokens sharing an adapter) that overlap their block, so any number of
  segments is served and none is skipped. The shrink is split over K (`split_k` programs per
  block and slice, each writing its partial sums to its own plane of `s`; no atomics) so that a
  prefill fills the GPU instead of walking K=1024..3072 serially in a few dozen programs; the
  expand adds the planes up in order, each program walking several column tiles of its token
  block (`LoRATiles.expand_columns`) so its segment lookups are paid once.
- `gather` (decode): one fused launch per target. Program (token, column group, slice) reads
  its slot from `token_slot`, loads its first B and y column tile, computes its token's s (A
  is 16 x K: small; K in steps of a few unrolled chunks whose loads are in flight together)
  and adds the delta to its columns, a tile at a time, the next tile's loads in flight. Half
  the launches of shrink + expand and no s buffer: at decode sizes a LoRA kernel costs its
  launch and memory latency, not its bytes. A program takes one column tile at small batches
  and several at large ones (`LoRATiles.expand_columns`), so a batch of 32 does not re-read
  every token's A once per tile.
A token's sum order (K step, split planes) depends on the target's shape alone
(`LoRATiles.ORDER_FIELDS`), so its delta is bit-identical in any batch, eager or replayed.
Launch grids depend only on the (padded) token count and the target's shape, never on the
batch: a graph captured at one size is right for every batch replayed at that size. Tokens at
or past the batch's own count (`real_tokens`, the padding of a captured size) and tokens of the
base model (slot -1) cost no work and add nothing (the sgmv expand never reads the s rows the
shrink skipped); a slot's rank masks its weights, so a smaller adapter in a reused slot never
reads the previous one's rows.
"""

from __future__ import annotations

import functools

import torch

from tesela.core.pdl import grid_dependency_sync, launch_kwargs
from tesela.lora.tiles import GATHER, SGMV, LoRATiles, choose_tiles, rank_block


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def shrink_sgmv(
        x_ptr, a_ptr, s_ptr, token_seg_ptr, seg_start_ptr, seg_slot_ptr, ranks_ptr, real_ptr,
        K, k_per_split, stride_xm, stride_a_slot, stride_a_slice, stride_a_rank,
        stride_s_split, stride_sm,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        IEEE: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        grid_dependency_sync(PDL)
        pid_m, j, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        m_start = pid_m * BLOCK_M
        m_end = tl.minimum(m_start + BLOCK_M, tl.load(real_ptr))  # padding: no work
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        rows = m_start + tl.arange(0, BLOCK_M)
        r = tl.arange(0, BLOCK_R)
        s_base = s_ptr + pid_k.to(tl.int64) * stride_s_split
        seg = tl.load(token_seg_ptr + m_start, mask=m_start < m_end, other=0)
        seg_lo = tl.load(seg_start_ptr + seg)
        seg_lo = tl.where(m_start < m_end, seg_lo, m_end)
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
        ranks_ptr, scalings_ptr, real_ptr,
        columns_per_program, stride_s_split, stride_sm, stride_b_slot, stride_b_row,
        stride_ym,
        SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        grid_dependency_sync(PDL)
        pid_m, pid_n, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offset = tl.load(slice_off_ptr + j)
        size = tl.load(slice_off_ptr + j + 1) - offset
        m_start = pid_m * BLOCK_M
        m_end = tl.minimum(m_start + BLOCK_M, tl.load(real_ptr))  # padding: no work
        col_lo = pid_n * columns_per_program
        if (col_lo < size) & (m_start < m_end):
            # A program resolves its token block's segments once, then walks its columns in
            # BLOCK_N tiles: the loads of y and B of one tile are independent of the last
            # tile's, so the loop pipelines them (a program per tile spent most of its time in
            # the chain of segment lookups before its first load).
            col_hi = tl.minimum(col_lo + columns_per_program, size)
            rows = m_start + tl.arange(0, BLOCK_M)
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
                    b_base = b_ptr + slot.to(tl.int64) * stride_b_slot + r[:, None]
                    for n0 in range(col_lo, col_hi, BLOCK_N):
                        cols = n0 + tl.arange(0, BLOCK_N)
                        col_mask = cols < col_hi
                        bt = tl.load(
                            b_base + (offset + cols)[None, :].to(tl.int64) * stride_b_row,
                            mask=(r < rank)[:, None] & col_mask[None, :], other=0.0,
                        )  # fmt: skip
                        y_offs = rows[:, None].to(tl.int64) * stride_ym + (offset + cols)[None, :]
                        mask = row_mask[:, None] & col_mask[None, :]
                        y = tl.load(y_ptr + y_offs, mask=mask, other=0.0)
                        if IEEE:
                            delta = tl.dot(st, bt.to(tl.float32), input_precision="ieee")
                        else:
                            delta = tl.dot(st.to(bt.dtype), bt)
                        out = y.to(tl.float32) + delta * scaling
                        tl.store(y_ptr + y_offs, out.to(y.dtype), mask=mask)
                seg += 1
                seg_lo = seg_hi

    @triton.jit
    def lora_gather(
        x_ptr, a_ptr, b_ptr, y_ptr, slice_off_ptr, token_slot_ptr, ranks_ptr, scalings_ptr,
        real_ptr, K, columns_per_program, stride_xm, stride_a_slot, stride_a_slice, stride_a_rank,
        stride_b_slot, stride_b_row, stride_ym,
        K_UNROLL: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        grid_dependency_sync(PDL)
        t, pid_n, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        slot = tl.load(token_slot_ptr + t, mask=t < tl.load(real_ptr), other=-1)  # padding: -1
        offset = tl.load(slice_off_ptr + j)
        size = tl.load(slice_off_ptr + j + 1) - offset
        col_lo = pid_n * columns_per_program
        if (slot >= 0) & (col_lo < size):
            col_hi = tl.minimum(col_lo + columns_per_program, size)
            rank = tl.load(ranks_ptr + slot)
            scaling = tl.load(scalings_ptr + slot)
            r = tl.arange(0, BLOCK_R)
            rank_mask = r < rank
            # B's rows are the output columns: a column tile's B is b_tile + cols * stride.
            b_tile = b_ptr + slot.to(tl.int64) * stride_b_slot + r[None, :]
            b_tile += offset.to(tl.int64) * stride_b_row
            y_row = y_ptr + t.to(tl.int64) * stride_ym + offset
            # The first column tile's B and y first: their loads depend only on the slot, so
            # they are in flight with the shrink's (the compiler does not move loads across the
            # shrink's reduction).
            cols = col_lo + tl.arange(0, BLOCK_N)
            col_mask = cols < col_hi
            b_mask = rank_mask[None, :]
            bt = tl.load(
                b_tile + cols[:, None] * stride_b_row, mask=col_mask[:, None] & b_mask, other=0.0
            )  # fmt: skip
            y = tl.load(y_row + cols, mask=col_mask, other=0.0)
            # Shrink, once for all the program's columns: K_UNROLL chunks per step are
            # unrolled, so their loads issue back to back (one memory round trip per step, not
            # per chunk; at most ~2K elements of A in registers); one cross-thread sum at the
            # end.
            a_base = a_ptr + slot.to(tl.int64) * stride_a_slot + j * stride_a_slice
            x_base = x_ptr + t.to(tl.int64) * stride_xm
            acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, K_UNROLL * BLOCK_K):
                for c in tl.static_range(K_UNROLL):
                    ks = k0 + c * BLOCK_K + tl.arange(0, BLOCK_K)
                    xk = tl.load(x_base + ks, mask=ks < K, other=0.0)
                    at = tl.load(
                        a_base + r[:, None] * stride_a_rank + ks[None, :],
                        mask=rank_mask[:, None] & (ks < K)[None, :], other=0.0,
                    )  # fmt: skip
                    acc += at.to(tl.float32) * xk.to(tl.float32)[None, :]
            s = tl.sum(acc, axis=1)
            # Expand: the program's columns of the slice, BLOCK_N at a time (each column one
            # dot over the rank, whatever tile it falls in), the next tile's loads issued
            # before this tile's sums.
            for n0 in range(col_lo + BLOCK_N, col_hi + BLOCK_N, BLOCK_N):
                next_cols = n0 + tl.arange(0, BLOCK_N)
                next_mask = next_cols < col_hi
                next_bt = tl.load(
                    b_tile + next_cols[:, None] * stride_b_row,
                    mask=next_mask[:, None] & b_mask, other=0.0,
                )  # fmt: skip
                next_y = tl.load(y_row + next_cols, mask=next_mask, other=0.0)
                delta = tl.sum(bt.to(tl.float32) * s[None, :], axis=1) * scaling
                out = (y.to(tl.float32) + delta).to(y.dtype)
                tl.store(y_row + cols, out, mask=col_mask)
                bt, y, cols, col_mask = next_bt, next_y, next_cols, next_mask

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

    a: [slots, slices, max_rank, in]; b: [slots, out, max_rank]; `state` holds the persistent
    per-batch buffers (token_slot, token_seg, seg_start, seg_slot, ranks, scalings); `tiles`
    overrides the tile choice (tests)."""
    num_tokens, K = x.shape
    num_slices, block_r = a.shape[1], rank_block(a.shape[2])
    assert a.stride(3) == 1 and b.stride(2) == 1 and x.stride(1) == 1 and y.stride(1) == 1
    assert style in (SGMV, GATHER), style
    tiles = tiles or choose_tiles(style, num_tokens, K, max_slice_size, num_slices, block_r, x)
    if style == SGMV:
        _launch_sgmv(x, y, a, b, slice_offsets, max_slice_size, state, tiles)
        return
    _, _, lora_gather = _kernels()
    columns = tiles.expand_columns(num_tokens, max_slice_size, num_slices)
    grid = (num_tokens, -(-max_slice_size // columns), num_slices)
    lora_gather[grid](
        x, a, b, y, slice_offsets, state.token_slot, state.ranks, state.scalings,
        state.real_tokens, K, columns, x.stride(0), a.stride(0), a.stride(1), a.stride(2),
        b.stride(0), b.stride(1), y.stride(0),
        K_UNROLL=tiles.k_unroll(K), BLOCK_K=tiles.block_k, BLOCK_N=tiles.block_n,
        BLOCK_R=block_r, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        **launch_kwargs(x.device, num_tokens),
    )  # fmt: skip


def _launch_sgmv(x, y, a, b, slice_offsets, max_slice_size, state, tiles: LoRATiles) -> None:
    """Shrink into `split_k` fp32 planes of s, then expand, summing the planes in a fixed
    order."""
    _, expand_sgmv, _ = _kernels()
    num_tokens = x.shape[0]
    num_slices, block_r = a.shape[1], rank_block(a.shape[2])
    s = sgmv_shrink(x, a, state, tiles)
    columns = tiles.expand_columns(num_tokens, max_slice_size, num_slices)
    expand_sgmv[(-(-num_tokens // tiles.block_m), -(-max_slice_size // columns), num_slices)](
        s, b, y, slice_offsets, state.token_seg, state.seg_start, state.seg_slot,
        state.ranks, state.scalings, state.real_tokens,
        columns, s.stride(0), s.stride(1), b.stride(0), b.stride(1), y.stride(0),
        SPLIT_K=s.shape[0], BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_R=block_r,
        IEEE=x.dtype == torch.float32, num_warps=tiles.expand_warps, num_stages=tiles.num_stages,
        **launch_kwargs(x.device, num_tokens),
    )  # fmt: skip


def sgmv_shrink(x: torch.Tensor, a: torch.Tensor, state, tiles: LoRATiles) -> torch.Tensor:
    """s: [split_k, tokens, slices * rank width] fp32, each (token block, slice, split) program
    writing its K range's partial sums to its own plane; rows of base-model and padding tokens
    are left unwritten (every reader masks them by their slot)."""
    shrink_sgmv, _, _ = _kernels()
    num_tokens, K = x.shape
    num_slices, block_r = a.shape[1], rank_block(a.shape[2])
    split_k = tiles.num_splits(K)
    s = torch.empty(split_k, num_tokens, num_slices * block_r, dtype=torch.float32, device=x.device)
    shrink_sgmv[(-(-num_tokens // tiles.block_m), num_slices, split_k)](
        x, a, s, state.token_seg, state.seg_start, state.seg_slot, state.ranks,
        state.real_tokens, K, tiles.k_per_split(K), x.stride(0), a.stride(0), a.stride(1),
        a.stride(2), s.stride(0), s.stride(1),
        BLOCK_M=tiles.block_m, BLOCK_K=tiles.block_k, BLOCK_R=block_r,
        IEEE=x.dtype == torch.float32, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        **launch_kwargs(x.device, num_tokens),
    )  # fmt: skip
    return s


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
            y[start:end, lo:hi] += scalings[slot] * (shrunk @ b[slot, lo:hi, :rank].T)


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
    out = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float64)
    for t, slot in enumerate(token_slot.tolist()):
        if slot < 0:
            continue
        rank = int(ranks[slot])
        for j in range(a.shape[1]):
            lo, hi = slice_offsets[j], slice_offsets[j + 1]
            shrunk = x[t].double() @ a[slot, j, :rank].double().T
            out[t, lo:hi] = float(scalings[slot]) * (shrunk @ b[slot, lo:hi, :rank].double().T)
    return out
