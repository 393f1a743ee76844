"""The base GEMM with the LoRA delta inside: one launch per target at decode sizes, two at
prefill sizes.

    y[t] = x[t] @ W.T (+ bias) + scaling[slot] * s[t, j] @ B[slot, cols_j].T
    s[t, j] = x[t] @ A[slot, j].T                       (the sgmv shrink, tesela/lora/kernels.py)

The base GEMM followed by the sgmv pair costs three launches per target, and the sgmv expand
reads and rewrites all of y: at 1024 tokens of qwen3-0.6b's gate_up (N = 6144) that round trip
is most of the delta's cost. Here the shrink runs first (its planes of s are 16 columns a slice
per token: small), and then one Triton GEMM (x and W read through TMA descriptors) computes a
BLOCK_M x BLOCK_N tile of y whole: the base K loop, then, in the epilogue, one rank-16 MMA per
adapter slot present in the block, s (its rows selected to the slot's tokens) @ B[slot].T (zero
past the slot's rank) times its scaling, added to the fp32 accumulator before the one rounding
to y's dtype. So y is written once, with no read-modify-write and no third launch, and a block
spanning many requests pays a small MMA per adapter, not a pass over K.

The epilogue reads its tokens' slots (`token_slot`), not the segment list: the segment walk
is a chain of dependent loads, and a program that ran it after its K loop spent longer there
than in a 1024-token GEMM's loop (docs/bench-results.md). Its loads are issued before the K
loop instead, so their latency hides under it: the tile's rows of s, and B for the slots of the
block's first and last tokens (a block holds one or two adapters unless requests are shorter
than it); a slot found only in between costs one more load after the loop.

A token's result depends only on its own row: BLOCK_K (the K order of the base sum) is one
constant for every launch, tl.dot adds a tile's products in K order whatever BLOCK_M and
BLOCK_N are, and the shrink's sum order is its shape's (`LoRATiles.ORDER_FIELDS`); so a token's
output is the same in any batch, eager or replayed. The grid depends on the (padded) token
count and the target's shape only: a graph captured at one size serves every batch at that
size, with any number of segments, none skipped (base-model and padding tokens carry slot -1,
or lie past the batch's `real_tokens`, and get the plain GEMM). Every column tile lies in one
slice (BLOCK_N divides every slice width), so a program reads one slice's s and B.

Up to SMALL_MAX_TOKENS tokens (decode steps, short chunks) a separate shrink launch costs as
much as the whole GEMM, so `lora_small_gemm` does everything in one launch: all tokens in one
token tile (16, 32 or 64 rows), a program per column tile, and in its K loop, beside x @ W.T,
the shrink of every adapter slot at once, x @ [A[0, j]; A[1, j]; ...].T (slots x rank-width
columns: 64 for 4 slots at rank 16; at these sizes the GEMM streams W from memory and the
extra MMA is free, its A tiles shared by all programs through L2). After the loop one MMA adds
every delta: a token's row of s keeps only its own slot's columns (none for base-model and
padding tokens), times B of all slots stacked over the same columns, times its slot's scaling.
What no kernel of the step writes (B, the ranks and scalings, the batch's slots and count,
copied in before the step's first kernel) is loaded before the PDL wait, under the previous
kernel's tail. Where N is narrow or K long (o and down), a column tile's K is split over
`split_k` programs (whole BLOCK_K steps each), so the weight streams through more SMs and
each program re-reads only its share of the slots' A: each leaves its partial sums (base and
shrink) in a workspace, and the tile's last program to arrive (an acq_rel count per tile in
the LoRA buffers, put back to zero by that program) adds them in split order and runs the
epilogue. The sum is the same whichever program arrives last. A token's row depends on the
token tile's height (the MMA instructions, `small_block_m`) and on its bucket's entry (the split
count, or no entry: the base linear + gather). A replay equals the same padded batch run
eagerly; against the unpadded batch, a padded size lies in its batch's bucket wherever the
ladders hold the powers of two (FULL decode: 1, 2, 4, 8, ...; piecewise: from 4 on), so only a
1-2 token extend batch replayed at 4 tokens may take another entry, as cuBLAS may take another
kernel at another row count.

Both run only where `python3 -m tesela.tune.lora --styles fused` measured them faster than what
the layer runs otherwise (the table's `fused` entries, per target shape and token bucket): the
base linear (cuBLAS, or the tuned Triton GEMV at 1-16 tokens) followed by gather at up to 64
tokens, by sgmv above. On H200: in one launch, every qwen3-0.6b and llama-3.2-1b target at
1-64 tokens but the o projections at 1-2 tokens (qwen3-0.6b) and 1 (llama-3.2-1b), where the
GEMV + gather wins; as shrink + GEMM, every target from 128 to 4096 tokens but some buckets.
The TMA GEMM, its epilogue's loads included, runs 0-35% longer than cuBLAS at 1024 tokens; the
saved launch and y round trip pay for that, most where y is wide.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional on CPU: nothing launches then
    triton = None

from tesela.core.intmath import next_power_of_2
from tesela.core.pdl import grid_dependency_sync, launch_kwargs
from tesela.core.scratch import SPLIT_K_ARRIVALS
from tesela.lora import tiles as lora_tiles
from tesela.lora.kernels import sgmv_shrink
from tesela.lora.tiles import FUSED, LoRATiles

BLOCK_K = 64  # the K step of every fused launch: it fixes a token's sum order, so never tuned
# Up to this many tokens (decode steps, short chunks) one launch does it all (`lora_small_gemm`):
# the shrink of every slot inside the base GEMM's K loop, for at most SMALL_MAX_SLOTS slots.
SMALL_MAX_TOKENS = 64
SMALL_MAX_SLOTS = 4


def small_block_m(num_tokens: int) -> int:
    """The token tile of `lora_small_gemm`: every token in one tile (16, 32 or 64 rows). A
    padded size and the batch it serves fall in the same tile (the ladder holds 16, 32 and 64),
    so the same MMA instructions sum a token's row in both."""
    return max(16, next_power_of_2(num_tokens))


@dataclass(frozen=True)
class FusedTiles:
    block_m: int = 128
    block_n: int = 128
    block_k: int = BLOCK_K
    group_m: int = 8  # row blocks walked together, so their W tiles are shared in L2
    num_warps: int = 8
    num_stages: int = 3
    # `lora_small_gemm` (at most SMALL_MAX_TOKENS tokens, every slot's shrink inside, one
    # launch; its token tile is `small_block_m`'s, block_m only records it; group_m unused),
    # else the TMA GEMM after the sgmv shrink
    small: bool = False
    split_k: int = 1  # small: programs per column tile over disjoint K ranges (sum order)

    def fits(self, slice_sizes: list[int] | tuple[int, ...]) -> bool:
        """Whether every column tile lies inside one slice."""
        return all(size % self.block_n == 0 for size in slice_sizes)


def fused_tiles(x: torch.Tensor, weight, a, slice_sizes: list[int]) -> FusedTiles | None:
    """The tuned tiles of the fused kernel for this launch, or None: the base GEMM, then the
    LoRA kernels. Only where a tuning run measured the fused kernel faster for this target
    shape and token bucket on this device (`python3 -m tesela.tune.lora --styles fused`), with
    the adapters' rank width (16) and, up to SMALL_MAX_TOKENS, the slot count (at most
    SMALL_MAX_SLOTS) it was tuned at; above that, only for operands TMA can read (contiguous,
    16-byte aligned rows and bases)."""
    if x.device.type != "cuda" or lora_tiles.rank_block(a.shape[2]) != 16:
        return None  # the table is tuned at rank width 16
    key = lora_tiles.shape_key(x.shape[1], max(slice_sizes), len(slice_sizes))
    entry = _entry(torch.cuda.get_device_name(x.device), x.dtype, key, x.shape[0])
    if entry is None or not entry.fits(slice_sizes):
        return None
    if entry.small:  # (its buckets hold at most SMALL_MAX_TOKENS tokens)
        return entry if a.shape[0] <= SMALL_MAX_SLOTS and weight.stride(1) == 1 else None
    return entry if _tma_ready(x) and _tma_ready(weight) else None


def _tma_ready(t: torch.Tensor) -> bool:
    rows_aligned = all(stride * t.element_size() % 16 == 0 for stride in t.stride()[:-1])
    return t.is_contiguous() and rows_aligned and t.data_ptr() % 16 == 0


def fused_entries(device_name: str, dtype: str = "bfloat16") -> dict[str, dict[str, list[int]]]:
    """Target shape ("K,N,S": input width, widest slice, slices) -> {"one_launch": token
    buckets where the table runs `lora_small_gemm`, "fused": those where it runs the shrink and
    the TMA GEMM} on this device (what `tesela doctor` shows)."""
    entries = {}
    for key, buckets in _fused_shapes(device_name, dtype).items():
        kinds = {"one_launch": [], "fused": []}
        for bucket, tiles in buckets.items():
            kinds["one_launch" if tiles.get("small") else "fused"].append(int(bucket))
        if buckets:
            entries[key] = {kind: sorted(found) for kind, found in kinds.items()}
    return entries


def _fused_shapes(device_name: str, dtype: str) -> dict:
    return lora_tiles.tuned_table().get(device_name, {}).get(dtype, {}).get(FUSED, {})


@functools.lru_cache(maxsize=4096)  # eager forwards ask per LoRA layer: keep it cheap
def _entry(device_name: str, dtype: torch.dtype, key: str, num_tokens: int) -> FusedTiles | None:
    shapes = _fused_shapes(device_name, str(dtype).removeprefix("torch."))
    entry = shapes.get(key, {}).get(str(lora_tiles.token_bucket(num_tokens)))
    return replace(FusedTiles(**entry), block_k=BLOCK_K) if entry else None  # K order: fixed


if triton is not None:

    @triton.jit
    def slot_delta(acc, st, row_slot, slot, bt, rank, scaling, r, IEEE: tl.constexpr):
        """acc plus one adapter slot's expand: s's rows of the slot's tokens @ B[slot] (its
        rank rows past the adapter's rank, another adapter's or NaN junk, zeroed), scaled."""
        sa = tl.where((row_slot == slot)[:, None], st, 0.0)
        bt = tl.where((r < rank)[:, None], bt, 0.0)
        if IEEE:
            delta = tl.dot(sa, bt, input_precision="ieee")
        else:
            delta = tl.dot(sa.to(bt.dtype), bt)
        return acc + delta * scaling

    @triton.jit
    def small_epilogue(
        acc, s, rows, cols, c_slot, c_r, c_rank, b_tile, row_slot, row_scaling, real,
        bias_ptr, y_ptr, M, N, stride_ym, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """`lora_small_gemm`'s expand, one MMA for all slots: a token keeps only its own
        slot's columns of s (base-model and padding tokens none), so it gets exactly its
        delta; then the bias, and y's one rounding."""
        row_slot = tl.where(rows < real, row_slot, -1)  # padding tokens: no delta
        s = tl.where((row_slot[:, None] == c_slot[None, :]) & (c_r < c_rank)[None, :], s, 0.0)
        if IEEE:
            delta = tl.dot(s, b_tile, input_precision="ieee")
        else:
            delta = tl.dot(s.to(b_tile.dtype), b_tile)
        acc += delta * row_scaling[:, None]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        y_offs = rows[:, None].to(tl.int64) * stride_ym + cols[None, :]
        tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=(rows < M)[:, None])


@functools.cache
def _kernels():
    @triton.jit
    def lora_gemm(
        x_desc, w_desc, y_desc, b_ptr, s_ptr, bias_ptr,
        token_slot_ptr, ranks_ptr, scalings_ptr, real_ptr,
        M, N, K, SLICE_1, SLICE_2, stride_b_slot, stride_b_row, stride_s_split, stride_sm,
        MAX_RANK: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
        # What the expand needs is loaded before the K loop and used after it, so its latency
        # hides under the GEMM. Only one round of loads (the block's slots) is waited for
        # before the loop: no address depends on a loaded value but B's (on its slot), masks
        # that need loaded values (the batch's token count, the slot's rank) are applied after
        # the loop as selects, and the slice bounds are launch arguments.
        j = (n0 >= SLICE_1).to(tl.int32) + (n0 >= SLICE_2).to(tl.int32)  # this tile's slice
        real = tl.load(real_ptr)
        row_slot = tl.load(token_slot_ptr + rows, mask=rows < M, other=-1)
        s_offs = rows[:, None].to(tl.int64) * stride_sm + j * BLOCK_R + r[None, :]
        st = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for split in tl.static_range(SPLIT_K):  # the shrink's K planes, in order
            # Rows the shrink did not write (base-model and padding tokens) hold junk: every
            # use below selects only rows of the slot whose delta it adds.
            st += tl.load(s_ptr + split * stride_s_split + s_offs, mask=(rows < M)[:, None])
        # The slots of the block's first and last tokens (a block holds one or two adapters'
        # segments but where requests are shorter than it) and their B tiles, read as rank x
        # columns. A slot of a padding token (past the batch's count: whatever the last batch
        # left) only costs an MMA that no row selects. Pointer loads: they stay in flight
        # through the K loop (a TMA load outside a pipelined loop waits where it is issued).
        first = tl.load(token_slot_ptr + m0)
        last = tl.load(token_slot_ptr + tl.minimum(m0 + BLOCK_M, M) - 1)
        b_cols = b_ptr + cols[None, :].to(tl.int64) * stride_b_row + r[:, None]
        b_mask = (r < MAX_RANK)[:, None]
        b_first = tl.load(b_cols + tl.maximum(first, 0).to(tl.int64) * stride_b_slot, mask=b_mask)
        b_last = tl.load(b_cols + tl.maximum(last, 0).to(tl.int64) * stride_b_slot, mask=b_mask)
        rank_first = tl.load(ranks_ptr + tl.maximum(first, 0))
        rank_last = tl.load(ranks_ptr + tl.maximum(last, 0))
        scaling_first = tl.load(scalings_ptr + tl.maximum(first, 0))
        scaling_last = tl.load(scalings_ptr + tl.maximum(last, 0))
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if IEEE:
                acc += tl.dot(
                    x_desc.load([m0, k0]), w_desc.load([n0, k0]).T, input_precision="ieee"
                )
            else:
                acc = tl.dot(x_desc.load([m0, k0]), w_desc.load([n0, k0]).T, acc)
        # The expand, one rank-wide MMA per adapter slot in the block: a token's row of s is
        # selected in its own slot's MMA only, so it gets exactly its delta. Rank rows of B
        # past the slot's adapter rank (another adapter's, or NaN junk) are zeroed.
        row_slot = tl.where(rows < real, row_slot, -1)  # padding tokens: the plain GEMM
        if first >= 0:
            acc = slot_delta(acc, st, row_slot, first, b_first, rank_first, scaling_first, r, IEEE)
        if (last >= 0) & (last != first):
            acc = slot_delta(acc, st, row_slot, last, b_last, rank_last, scaling_last, r, IEEE)
        # Any other slot (short requests, decode rows of a mixed batch): one at a time.
        rest = (row_slot >= 0) & (row_slot != first) & (row_slot != last)
        while tl.sum(rest.to(tl.int32)) > 0:
            slot = tl.max(tl.where(rest, row_slot, -1))
            bt = tl.load(b_cols + slot.to(tl.int64) * stride_b_slot, mask=b_mask)
            rank, scaling = tl.load(ranks_ptr + slot), tl.load(scalings_ptr + slot)
            acc = slot_delta(acc, st, row_slot, slot, bt, rank, scaling, r, IEEE)
            rest = rest & (row_slot != slot)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        y_desc.store([m0, n0], acc.to(y_desc.dtype))

    @triton.jit
    def lora_small_gemm(
        x_ptr, w_ptr, y_ptr, a_ptr, b_ptr, bias_ptr,
        token_slot_ptr, ranks_ptr, scalings_ptr, real_ptr, partial_ptr, arrived_ptr,
        M, N, K, SLICE_1, SLICE_2, stride_xm, stride_wn, stride_ym,
        stride_a_slot, stride_a_slice, stride_a_rank, stride_b_slot, stride_b_row, k_per_split,
        SLOTS: tl.constexpr, MAX_RANK: tl.constexpr, HAS_BIAS: tl.constexpr,
        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_SR: tl.constexpr, SPLIT_K: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        pid_n, split = tl.program_id(0) // SPLIT_K, tl.program_id(0) % SPLIT_K
        n0 = pid_n * BLOCK_N
        rows = tl.arange(0, BLOCK_M)
        cols = n0 + tl.arange(0, BLOCK_N)
        # Every slot's rank rows side by side: column c of s is slot c // BLOCK_R, rank row
        # c % BLOCK_R. Rows past a slot's rank, or past the slots, are masked out of A and B.
        c = tl.arange(0, BLOCK_SR)
        c_slot, c_r = c // BLOCK_R, c % BLOCK_R
        j = (n0 >= SLICE_1).to(tl.int32) + (n0 >= SLICE_2).to(tl.int32)  # this tile's slice
        # Before the wait: what no kernel of the step writes (the adapters' weights, ranks and
        # scalings; the batch's slots and count, copied in before the step's first kernel), so
        # these loads overlap the previous kernel's tail.
        c_rank = tl.load(ranks_ptr + c_slot, mask=c_slot < SLOTS, other=0)
        b_tile = tl.load(
            b_ptr + c_slot[:, None].to(tl.int64) * stride_b_slot
            + cols[None, :].to(tl.int64) * stride_b_row + c_r[:, None],
            mask=(c_r < c_rank)[:, None] & (cols < N)[None, :], other=0.0,
        )  # fmt: skip
        row_slot = tl.load(token_slot_ptr + rows, mask=rows < M, other=-1)
        real = tl.load(real_ptr)
        row_scaling = tl.load(scalings_ptr + row_slot, mask=row_slot >= 0, other=0.0)
        a_rows = a_ptr + c_slot.to(tl.int64) * stride_a_slot + j * stride_a_slice
        a_rows += c_r * stride_a_rank
        a_mask = (c_slot < SLOTS) & (c_r < MAX_RANK)
        grid_dependency_sync(PDL)
        # One pass over this program's share of K: the base GEMM and every slot's shrink, on
        # the same x tiles.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        s = tl.zeros((BLOCK_M, BLOCK_SR), dtype=tl.float32)
        if SPLIT_K == 1:
            k_lo, k_hi = 0, K
        else:  # whole BLOCK_K steps each (k_per_split is a multiple), the last split the rest
            k_lo = split * k_per_split
            k_hi = tl.minimum(k_lo + k_per_split, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            xt = tl.load(
                x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
                mask=(rows < M)[:, None] & k_mask[None, :], other=0.0,
            )  # fmt: skip
            wt = tl.load(
                w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :],
                mask=(cols < N)[:, None] & k_mask[None, :], other=0.0,
            )  # fmt: skip
            at = tl.load(
                a_rows[:, None] + ks[None, :], mask=a_mask[:, None] & k_mask[None, :], other=0.0
            )
            if IEEE:
                acc += tl.dot(xt, tl.trans(wt), input_precision="ieee")
                s += tl.dot(xt, tl.trans(at), input_precision="ieee")
            else:
                acc = tl.dot(xt, tl.trans(wt), acc)
                s = tl.dot(xt, tl.trans(at), s)
        if SPLIT_K == 1:
            small_epilogue(
                acc, s, rows, cols, c_slot, c_r, c_rank, b_tile, row_slot, row_scaling, real,
                bias_ptr, y_ptr, M, N, stride_ym, HAS_BIAS, IEEE,
            )  # fmt: skip
        else:
            # Each split leaves its partial sums; the column tile's last program to arrive
            # adds them in split order (whichever arrived last: the sum is the same), so the
            # result depends on the shape's split count alone, never on scheduling.
            tile_rows = rows[:, None] + (pid_n * SPLIT_K + split) * BLOCK_M
            width = BLOCK_N + BLOCK_SR
            n_offs = tl.arange(0, BLOCK_N)[None, :]
            tl.store(partial_ptr + tile_rows * width + n_offs, acc)
            tl.store(partial_ptr + tile_rows * width + BLOCK_N + c[None, :], s)
            tl.debug_barrier()  # every thread's partial stored before the release below
            if tl.atomic_add(arrived_ptr + pid_n, 1, sem="acq_rel") == SPLIT_K - 1:
                tl.debug_barrier()
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                s = tl.zeros((BLOCK_M, BLOCK_SR), dtype=tl.float32)
                for i in tl.static_range(SPLIT_K):
                    part = (rows[:, None] + (pid_n * SPLIT_K + i) * BLOCK_M) * width
                    acc += tl.load(partial_ptr + part + n_offs, cache_modifier=".cg")
                    s += tl.load(partial_ptr + part + BLOCK_N + c[None, :], cache_modifier=".cg")
                tl.store(arrived_ptr + pid_n, 0)  # ready for the next launch
                small_epilogue(
                    acc, s, rows, cols, c_slot, c_r, c_rank, b_tile, row_slot, row_scaling,
                    real, bias_ptr, y_ptr, M, N, stride_ym, HAS_BIAS, IEEE,
                )  # fmt: skip

    return lora_gemm, lora_small_gemm


def lora_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    slice_sizes: Sequence[int],
    buffers,
    tiles: FusedTiles,
    shrink_tiles: LoRATiles | None = None,
) -> torch.Tensor:
    """x @ weight.T (+ bias) plus every token's LoRA delta: the sgmv shrink, then the GEMM with
    the expand in its epilogue.

    a: [slots, slices, max_rank, in]; b: [slots, out, max_rank]; `slice_sizes`: the target's
    output slices (q/k/v, gate/up: at most three); `buffers` are the persistent per-batch LoRA
    buffers (the shrink reads the segments; the GEMM token_slot, ranks, scalings and
    real_tokens); `shrink_tiles` overrides the shrink's (tests). x and weight are read through
    TMA tensor descriptors: contiguous rows, 16-byte aligned (`fused_tiles` checks)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = x.shape
    n = weight.shape[0]
    num_slices, max_rank = a.shape[1:3]
    assert b.stride(2) == 1, "B's rank must be its contiguous dim"
    block_r = lora_tiles.rank_block(max_rank)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    if tiles.small:
        _small_gemm(x, weight, bias, a, b, slice_sizes, buffers, tiles, y)
        return y
    if shrink_tiles is None:
        shrink_tiles = lora_tiles.choose_tiles(
            lora_tiles.SGMV, m, k, max(slice_sizes), num_slices, block_r, x
        )
    s = sgmv_shrink(x, a, buffers, shrink_tiles)
    # The slices' column bounds (at most three slices: q/k/v), past N where there are fewer.
    assert num_slices == len(slice_sizes) <= 3, slice_sizes
    bounds = ([*itertools.accumulate(slice_sizes)][:-1] + [n, n])[:2]
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    grid = (-(-m // bm) * -(-n // bn),)
    _kernels()[0][grid](
        TensorDescriptor.from_tensor(x, [bm, bk]),
        TensorDescriptor.from_tensor(weight, [bn, bk]),
        TensorDescriptor.from_tensor(y, [bm, bn]),
        b, s, bias if bias is not None else weight,
        buffers.token_slot, buffers.ranks, buffers.scalings, buffers.real_tokens,
        m, n, k, *bounds, b.stride(0), b.stride(1), s.stride(0), s.stride(1),
        MAX_RANK=max_rank, SPLIT_K=s.shape[0], HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=block_r,
        GROUP_M=tiles.group_m, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        **launch_kwargs(x.device, m),
    )  # fmt: skip
    return y


def _small_gemm(x, weight, bias, a, b, slice_sizes, buffers, tiles: FusedTiles, y) -> None:
    """`lora_small_gemm` over every token at once: `split_k` programs per column tile."""
    m, k = x.shape
    n = weight.shape[0]
    slots, num_slices, max_rank = a.shape[:3]
    block_r = lora_tiles.rank_block(max_rank)
    assert m <= SMALL_MAX_TOKENS, f"{m} tokens: the small kernel holds every token in one tile"
    assert x.stride(1) == 1 and weight.stride(1) == 1 and a.stride(3) == 1 and y.stride(1) == 1
    bounds = ([*itertools.accumulate(slice_sizes)][:-1] + [n, n])[:2]
    block_m, block_sr, splits = small_block_m(m), next_power_of_2(slots) * block_r, tiles.split_k
    column_tiles = -(-n // tiles.block_n)
    steps = -(-k // tiles.block_k)
    k_per_split = -(-steps // splits) * tiles.block_k
    if splits > 1:  # each split's partial sums, and per column tile a count of arrived splits
        partials = torch.empty(
            column_tiles * splits * block_m * (tiles.block_n + block_sr),
            dtype=torch.float32, device=x.device,
        )  # fmt: skip
        arrived = SPLIT_K_ARRIVALS.get(x.device, column_tiles)
    else:
        partials = arrived = y  # unused
    _kernels()[1][(column_tiles * splits,)](
        x, weight, y, a, b, bias if bias is not None else weight,
        buffers.token_slot, buffers.ranks, buffers.scalings, buffers.real_tokens,
        partials, arrived,
        m, n, k, *bounds, x.stride(0), weight.stride(0), y.stride(0),
        a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), k_per_split,
        SLOTS=slots, MAX_RANK=max_rank, HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, BLOCK_R=block_r, BLOCK_SR=block_sr, SPLIT_K=splits,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        **launch_kwargs(x.device, m),
    )  # fmt: skip
