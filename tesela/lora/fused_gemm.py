"""The base GEMM with the LoRA delta inside it: one kernel per LoRA target at prefill sizes.

    y[t] = x[t] @ W.T (+ bias) + scaling[slot] * (x[t] @ A[slot, j].T) @ B[slot, cols_j].T

At prefill sizes the separate shrink and expand kernels (tesela/lora/kernels.py, `sgmv`) cost
almost as much as the base GEMM itself: two more launches per target, and the expand reads and
rewrites all of y. Here a program owns a BLOCK_M x BLOCK_N tile of y and computes it whole:

- the base GEMM's K loop (x, W, A and B read through TMA descriptors), with the shrink of the
  tile's tokens riding along (x's tile is loaded already; the shrink is one more tl.dot of
  BLOCK_R = 16 columns per K step, BLOCK_R / BLOCK_N more MMA work) when all of the block's
  tokens share one adapter, the common case of a prefill (segments are whole requests);
- a block that spans several segments (segment boundaries, decode rows of a mixed batch) runs
  the plain K loop, then one more pass over K per adapter segment in it, x masked to that
  segment's tokens;
- the expand in the epilogue: per segment of the block, s (masked to its tokens) @ B.T times
  its scaling, added to the fp32 accumulator before the one rounding to y's dtype.

No partial sums leave the program, so y is written once and a token's result depends only on
its own row: BLOCK_K (the K order of every sum) is one constant for every launch, and
tl.dot adds a tile's products in K order whatever BLOCK_M and BLOCK_N are, so a token's output
is the same in any batch, eager or replayed. The grid depends on the (padded) token count and
the target's shape only: a graph captured at one size serves every batch at that size, with
any number of segments, none skipped (base-model and padding tokens carry slot -1 and get the
plain GEMM). Every column tile lies in one slice (BLOCK_N divides every slice width), so a
program shrinks with one slice's A.

It runs only where `python3 -m tesela.tune.lora --styles fused` measured it faster than cuBLAS
followed by sgmv (the table's `fused` entries). On H200 that is 2048 tokens and up: a Triton
TMA GEMM comes within 3-14% of cuBLAS, and the saved launches and y round trip pay for that
once blocks hold one adapter; with shorter rows a block spans several segments and pays a K
pass for each (docs/bench-results.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from tesela.core.pdl import grid_dependency_sync, launch_kwargs
from tesela.lora import tiles as lora_tiles

FUSED = "fused"  # its entries in tesela/lora/lora_tile_table.json, beside sgmv's and gather's
BLOCK_K = 64  # the K step of every fused launch: it fixes a token's sum order, so never tuned


@dataclass(frozen=True)
class FusedTiles:
    block_m: int = 128
    block_n: int = 128
    block_k: int = BLOCK_K
    group_m: int = 8  # row blocks walked together, so their W tiles are shared in L2
    num_warps: int = 8
    num_stages: int = 3

    def fits(self, slice_sizes: list[int] | tuple[int, ...]) -> bool:
        """Whether every column tile lies inside one slice."""
        return all(size % self.block_n == 0 for size in slice_sizes)


def fused_tiles(x: torch.Tensor, weight, a, b, slice_sizes: list[int]) -> FusedTiles | None:
    """The tuned tiles of the fused kernel for this launch, or None: the base GEMM, then the
    sgmv kernels. Only where a tuning run measured the fused kernel faster for this target
    shape and token bucket on this device (`python3 -m tesela.tune.lora --styles fused`), and
    only for operands TMA can read (contiguous, 16-byte aligned rows and bases)."""
    if x.device.type != "cuda" or lora_tiles.rank_block(a.shape[2]) != 16:
        return None  # the table is tuned at rank width 16
    key = lora_tiles.shape_key(x.shape[1], max(slice_sizes), len(slice_sizes))
    entry = _entry(torch.cuda.get_device_name(x.device), x.dtype, key, x.shape[0])
    if entry is None or not entry.fits(slice_sizes):
        return None
    return entry if all(map(_tma_ready, (x, weight, a, b))) else None


def _tma_ready(t: torch.Tensor) -> bool:
    rows_aligned = all(stride * t.element_size() % 16 == 0 for stride in t.stride()[:-1])
    return t.is_contiguous() and rows_aligned and t.data_ptr() % 16 == 0


def fused_entries(device_name: str, dtype: str = "bfloat16") -> dict[str, list[int]]:
    """Target shape ("K,N,S": input width, widest slice, slices) -> the token buckets where the
    table runs the fused kernel on this device (what `tesela doctor` shows)."""
    shapes = _fused_shapes(device_name, dtype)
    return {key: sorted(int(b) for b in buckets) for key, buckets in shapes.items() if buckets}


def _fused_shapes(device_name: str, dtype: str) -> dict:
    return lora_tiles.tuned_table().get(device_name, {}).get(dtype, {}).get(FUSED, {})


@functools.lru_cache(maxsize=4096)  # eager forwards ask per LoRA layer: keep it cheap
def _entry(device_name: str, dtype: torch.dtype, key: str, num_tokens: int) -> FusedTiles | None:
    shapes = _fused_shapes(device_name, str(dtype).removeprefix("torch."))
    entry = shapes.get(key, {}).get(str(lora_tiles.token_bucket(num_tokens)))
    return replace(FusedTiles(**entry), block_k=BLOCK_K) if entry else None  # K order: fixed


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def lora_gemm(
        x_desc, w_desc, y_desc, a_desc, b_desc, bias_ptr, slice_off_ptr,
        token_seg_ptr, seg_start_ptr, seg_slot_ptr, ranks_ptr, scalings_ptr, real_ptr,
        M, N, K, a_rows_per_slot, a_rows_per_slice, b_rows_per_slot,
        NUM_SLICES: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * blocks_n
        first_m = (pid // per_group) * GROUP_M
        group_size = tl.minimum(blocks_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_size
        pid_n = (pid % per_group) // group_size
        m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
        rows = m0 + tl.arange(0, BLOCK_M)
        cols = n0 + tl.arange(0, BLOCK_N)
        r = tl.arange(0, BLOCK_R)
        grid_dependency_sync(PDL)
        j = 0  # the slice of this column tile
        for i in tl.static_range(1, NUM_SLICES):
            j += (n0 >= tl.load(slice_off_ptr + i)).to(tl.int32)
        # The block's segments: none where it holds padding only (tokens past the batch's).
        m_end = tl.minimum(tl.minimum(m0 + BLOCK_M, M), tl.load(real_ptr))
        seg_first = tl.load(token_seg_ptr + m0, mask=m0 < m_end, other=1)
        seg_last = tl.load(token_seg_ptr + m_end - 1, mask=m0 < m_end, other=0)
        slot_first = tl.load(seg_slot_ptr + seg_first, mask=m0 < m_end, other=-1)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if (seg_first == seg_last) & (slot_first >= 0):  # one adapter: shrink along
            a_row = slot_first * a_rows_per_slot + j * a_rows_per_slice
            for k0 in range(0, K, BLOCK_K):
                xt = x_desc.load([m0, k0])
                if IEEE:
                    acc += tl.dot(xt, w_desc.load([n0, k0]).T, input_precision="ieee")
                    s += tl.dot(xt, a_desc.load([a_row, k0]).T, input_precision="ieee")
                else:
                    acc = tl.dot(xt, w_desc.load([n0, k0]).T, acc)
                    s = tl.dot(xt, a_desc.load([a_row, k0]).T, s)
        else:
            for k0 in range(0, K, BLOCK_K):
                if IEEE:
                    acc += tl.dot(
                        x_desc.load([m0, k0]), w_desc.load([n0, k0]).T, input_precision="ieee"
                    )
                else:
                    acc = tl.dot(x_desc.load([m0, k0]), w_desc.load([n0, k0]).T, acc)
            for seg in range(seg_first, seg_last + 1):  # each adapter segment of the block
                slot = tl.load(seg_slot_ptr + seg)
                if slot >= 0:
                    in_seg = (rows >= tl.load(seg_start_ptr + seg)) & (
                        rows < tl.load(seg_start_ptr + seg + 1)
                    )
                    a_row = slot * a_rows_per_slot + j * a_rows_per_slice
                    rank_mask = (tl.arange(0, BLOCK_R) < tl.load(ranks_ptr + slot))[None, :]
                    for k0 in range(0, K, BLOCK_K):
                        # Other segments' rows are zeroed in x and this slot's rows past its
                        # rank in A, so they add exact zeros to s (never 0 * NaN).
                        xt = tl.where(in_seg[:, None], x_desc.load([m0, k0]), 0.0)
                        at = tl.where(rank_mask, a_desc.load([a_row, k0]).T, 0.0)
                        if IEEE:
                            s += tl.dot(xt, at, input_precision="ieee")
                        else:
                            s = tl.dot(xt, at, s)
        for seg in range(seg_first, seg_last + 1):  # the expand, per adapter segment
            slot = tl.load(seg_slot_ptr + seg)
            if slot >= 0:
                rank = tl.load(ranks_ptr + slot)
                in_seg = (rows >= tl.load(seg_start_ptr + seg)) & (
                    rows < tl.load(seg_start_ptr + seg + 1)
                )
                # Rank rows of A and B past the slot's adapter rank hold another adapter's
                # values (or the next slice's): masked in s and B, so they add nothing,
                # whatever they hold (a NaN included).
                st = tl.where(in_seg[:, None] & (r < rank)[None, :], s, 0.0)
                bt = b_desc.load([slot * b_rows_per_slot + n0, 0]).T
                bt = tl.where((r < rank)[:, None], bt, 0.0)
                if IEEE:
                    delta = tl.dot(st, bt, input_precision="ieee")
                else:
                    delta = tl.dot(st.to(bt.dtype), bt)
                acc += delta * tl.load(scalings_ptr + slot)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        y_desc.store([m0, n0], acc.to(y_desc.dtype))

    return lora_gemm


def lora_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    slice_offsets: torch.Tensor,
    buffers,
    tiles: FusedTiles,
    block_r: int,
) -> torch.Tensor:
    """x @ weight.T (+ bias) plus every token's LoRA delta, in one launch.

    a: [slots, slices, max_rank, in]; b: [slots, out, max_rank]; `buffers` are the persistent
    per-batch LoRA buffers (token_seg, seg_start, seg_slot, ranks, scalings). Operands are read
    through TMA tensor descriptors: contiguous rows, 16-byte aligned (`supported`)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = x.shape
    n = weight.shape[0]
    slots, num_slices, max_rank = a.shape[:3]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    grid = (-(-m // bm) * -(-n // bn),)
    _kernel()[grid](
        TensorDescriptor.from_tensor(x, [bm, bk]),
        TensorDescriptor.from_tensor(weight, [bn, bk]),
        TensorDescriptor.from_tensor(y, [bm, bn]),
        TensorDescriptor.from_tensor(a.view(slots * num_slices * max_rank, k), [block_r, bk]),
        TensorDescriptor.from_tensor(b.view(slots * n, max_rank), [bn, block_r]),
        bias if bias is not None else weight, slice_offsets,
        buffers.token_seg, buffers.seg_start, buffers.seg_slot, buffers.ranks, buffers.scalings,
        buffers.real_tokens, m, n, k, num_slices * max_rank, max_rank, n,
        NUM_SLICES=num_slices, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=block_r, GROUP_M=tiles.group_m,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **launch_kwargs(x.device, m),
    )  # fmt: skip
    return y
