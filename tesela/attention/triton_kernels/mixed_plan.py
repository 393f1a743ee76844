"""FULL mixed graph planning on the device: the graph's first kernel derives the attention
metadata of the batch being replayed from the batch's own int32 pack.

Before a replay the host makes one device-to-device copy: the batch's pack
(`ForwardBatch.packed`: a header of rows, tokens and block-table width, then the token rows,
sequence lengths, prefix lengths, row starts and block tables, laid out as
`tesela.core.forward_batch.pack_layout` says) into a persistent buffer (`raw`). This kernel,
captured first in every FULL mixed graph, then writes the batch's tokens into the static token
buffers the model reads, and what the attention kernels read into the metadata buffer (`meta`,
laid out as `MixedGraphState` in tesela/attention/triton_backend.py says):

- per row: its tokens' ids, positions and KV slots; its sequence length, prefix length and
  first token; its block table (re-strided from the batch's width to the buffer's);
- the decode entries (with SPLIT_DECODE): the 1-token rows, in row order, with their token;
- the tile table: (row, first query) per query block of the other rows, ordered as
  `extend_attention.tile_table` orders them (longest causal walk first; ties: higher row,
  then later query first), each tile placed at its rank, computed in closed form per row;
- absent entries (-1) past the batch's tiles and decode entries, -1 lengths for rows past its
  rows, and padding tokens (token 0, position 0, the dummy KV slot 0) in the static token
  buffers past its tokens, up to the graph's size.

One program per row of the buffers, plus one for the absent entries and the padding; rows past
the batch's return at once. Launch values depend only on the captured graph (its size, query
tile, table sizes): the batch reaches the kernel only through `raw`.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from tesela.core.intmath import next_power_of_2
from tesela.core.kv_cache import DUMMY_SLOT
from tesela.core.pdl import grid_dependency_sync, launch_kwargs

CHUNK = 256  # elements a loop step copies or fills
TILE_CHUNK = 16  # query tiles a row ranks at once (a [TILE_CHUNK, rows] comparison)


@triton.jit
def _mixed_plan_kernel(
    raw_ptr,  # the batch's pack, int32 words
    meta_ptr,  # the graph's metadata buffer
    tokens_ptr,  # [3, tokens_stride] int64 static token buffers (ids, positions, KV slots)
    tokens_stride,
    max_rows,
    tiles_at,
    num_tiles,
    entries,
    tables_at,
    max_blocks,
    padded_tokens,
    ROWS: tl.constexpr,  # power of two >= max_rows
    BLOCK_M: tl.constexpr,
    SPLIT_DECODE: tl.constexpr,
    TILES: tl.constexpr,
    CHUNK: tl.constexpr,
    PAD_SLOT: tl.constexpr,
    PDL: tl.constexpr,
):
    grid_dependency_sync(PDL)
    pid = tl.program_id(0)
    n = tl.load(raw_ptr)
    num_tokens = tl.load(raw_ptr + 1)
    width = tl.load(raw_ptr + 2)
    # pack_layout: a 4-word header, then each array on a 16-byte boundary (4 words)
    token_rows = (raw_ptr + 4).to(tl.pointer_type(tl.int64))  # [3, num_tokens]
    seq_in = 4 + (6 * num_tokens + 3) // 4 * 4
    aligned = (n + 3) // 4 * 4
    prefix_in = seq_in + aligned
    starts_in = seq_in + 2 * aligned
    tables_in = seq_in + 3 * aligned
    rows = tl.arange(0, ROWS)
    valid = rows < n
    seq = tl.load(raw_ptr + seq_in + rows, mask=valid, other=0)
    prefix = tl.load(raw_ptr + prefix_in + rows, mask=valid, other=0)
    extend = seq - prefix
    if SPLIT_DECODE:
        decode = valid & (extend == 1)
    else:
        decode = rows < 0
    row_tiles = tl.where(valid & ~decode, (extend + BLOCK_M - 1) // BLOCK_M, 0)
    if pid < n:
        seq_r = tl.load(raw_ptr + seq_in + pid)
        prefix_r = tl.load(raw_ptr + prefix_in + pid)
        start_r = tl.load(raw_ptr + starts_in + pid)
        tl.store(meta_ptr + pid, seq_r)
        tl.store(meta_ptr + max_rows + pid, prefix_r)
        tl.store(meta_ptr + 2 * max_rows + pid, start_r)
        for c in range(0, width, CHUNK):
            cols = c + tl.arange(0, CHUNK)
            blocks = tl.load(raw_ptr + tables_in + pid * width + cols, mask=cols < width)
            tl.store(meta_ptr + tables_at + pid * max_blocks + cols, blocks, mask=cols < width)
        extend_r = seq_r - prefix_r
        for c in range(0, extend_r, CHUNK):  # the row's tokens: ids, positions, KV slots
            cols = start_r + c + tl.arange(0, CHUNK)
            mine = cols < start_r + extend_r
            for k in tl.static_range(3):
                value = tl.load(token_rows + k * num_tokens + cols, mask=mine)
                tl.store(tokens_ptr + k * tokens_stride + cols, value, mask=mine)
        tiles_r = (extend_r + BLOCK_M - 1) // BLOCK_M
        if SPLIT_DECODE:  # noqa: SIM102 (a constexpr test, resolved at compile time)
            if extend_r == 1:  # a decode entry, not a tile
                entry = tl.sum((decode & (rows < pid)).to(tl.int32))
                tl.store(meta_ptr + 3 * max_rows + entry, pid)
                tl.store(meta_ptr + 4 * max_rows + entry, start_r)
                tiles_r = tiles_r * 0
        for j0 in range(0, tiles_r, TILES):
            j = j0 + tl.arange(0, TILES)
            walk = prefix_r + j * BLOCK_M  # the tile's causal walk: its sort key
            # Per other row: its tiles with a longer walk, and (higher rows only) one with
            # the same walk, which the table's order puts first.
            d = walk[:, None] - prefix[None, :]
            longer = tl.where(
                d < 0, row_tiles[None, :], tl.maximum(row_tiles[None, :] - d // BLOCK_M - 1, 0)
            )
            tie = (d >= 0) & (d % BLOCK_M == 0) & (d // BLOCK_M < row_tiles[None, :])
            tie = tie & (rows[None, :] > pid)
            rank = tl.sum(longer + tie.to(tl.int32), axis=1)
            at = meta_ptr + tiles_at + 2 * rank
            real = (j < tiles_r) & (rank < num_tiles)
            tl.store(at, tl.full([TILES], 0, tl.int32) + pid, mask=real)
            tl.store(at + 1, j * BLOCK_M, mask=real)
    elif pid == max_rows:
        past = (rows >= n) & (rows < max_rows)  # the lengths of rows past the batch's
        absent = tl.full([ROWS], -1, tl.int32)
        tl.store(meta_ptr + rows, absent, mask=past)
        tl.store(meta_ptr + max_rows + rows, absent, mask=past)
        tl.store(meta_ptr + 2 * max_rows + rows, absent, mask=past)
        total_tiles = tl.sum(row_tiles)
        for t0 in range(0, num_tiles, CHUNK):
            t = t0 + tl.arange(0, CHUNK)
            gone = (t >= total_tiles) & (t < num_tiles)
            tl.store(meta_ptr + tiles_at + 2 * t, tl.full([CHUNK], -1, tl.int32), mask=gone)
            tl.store(meta_ptr + tiles_at + 2 * t + 1, tl.full([CHUNK], -1, tl.int32), mask=gone)
        if SPLIT_DECODE:
            used = tl.sum(decode.to(tl.int32))
            for e0 in range(0, entries, CHUNK):
                e = e0 + tl.arange(0, CHUNK)
                gone = (e >= used) & (e < entries)
                tl.store(meta_ptr + 3 * max_rows + e, tl.full([CHUNK], -1, tl.int32), mask=gone)
                tl.store(meta_ptr + 4 * max_rows + e, tl.full([CHUNK], -1, tl.int32), mask=gone)
        for c in range(num_tokens, padded_tokens, CHUNK):
            cols = c + tl.arange(0, CHUNK)
            pad = cols < padded_tokens
            zero = tl.full([CHUNK], 0, tl.int64)
            tl.store(tokens_ptr + cols, zero, mask=pad)
            tl.store(tokens_ptr + tokens_stride + cols, zero, mask=pad)
            tl.store(tokens_ptr + 2 * tokens_stride + cols, zero + PAD_SLOT, mask=pad)


def derive_mixed_plan(
    state, tokens: torch.Tensor, *, num_tiles: int, entries: int, padded_tokens: int, block_m: int
) -> None:
    """Launch the planning kernel for one captured graph (`entries` > 0: its decode rows get
    split-KV entries) over `state`, the backend's `MixedGraphState` (its `raw` and `meta`
    buffers and their layout); `tokens` is the [3, >= padded_tokens] int64 static token buffer
    the model reads."""
    if tokens.dtype != torch.int64 or tokens.dim() != 2 or tokens.stride(1) != 1:
        raise ValueError("the static token buffers must be [3, max_tokens] int64, row-major")
    _mixed_plan_kernel[(state.max_rows + 1,)](
        state.raw,
        state.meta,
        tokens,
        tokens.stride(0),
        state.max_rows,
        state.tiles_at,
        num_tiles,
        entries,
        state.tables_at,
        state.max_blocks_per_seq,
        padded_tokens,
        ROWS=next_power_of_2(state.max_rows),
        BLOCK_M=block_m,
        SPLIT_DECODE=entries > 0,
        TILES=TILE_CHUNK,
        CHUNK=CHUNK,
        PAD_SLOT=DUMMY_SLOT,
        # First in its graph, right after the pack's copy: no kernel to overlap, so no PDL.
        **launch_kwargs(state.raw.device, sys.maxsize),
    )
