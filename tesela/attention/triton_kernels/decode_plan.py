"""FULL decode graph planning on the device: the graph's first kernel writes the replayed
batch's tokens and attention inputs from the batch's own int32 pack.

Before a replay the host makes one device-to-device copy: the decode batch's pack
(`ForwardBatch.packed`, laid out as `tesela.core.forward_batch.pack_layout` says: a header of
rows, tokens and block-table width, then the token rows, sequence lengths, prefix lengths, row
starts and block tables) into a persistent buffer (`DecodeGraphState.raw`). This kernel,
captured first in every FULL decode graph, then writes, for each of the graph's rows:

- a batch row (one new token each): its token's id, position and KV slot into the static token
  buffers the model reads, its sequence length, and its block table (re-strided from the
  batch's width to the buffer's). The id is the host's unless the pack's token_src (after the
  block tables) names a row of the step still in flight (overlap scheduling): then it is that
  row's sampled token, read from the persistent buffer the sampling graphs write;
- a padding row past the batch's, up to the graph's size: token 0, position 0, the dummy KV
  slot, length 1 and the dummy block first in its table (a length-1 row reads nothing else).

One program per row of the captured size. Launch values depend only on the captured graph (its
size) and the buffers: the batch reaches the kernel only through `raw`.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from tesela.core.kv_cache import DUMMY_SLOT
from tesela.core.pdl import grid_dependency_sync, launch_kwargs

CHUNK = 256  # block-table entries a loop step copies


@triton.jit
def _decode_plan_kernel(
    raw_ptr,  # the batch's pack, int32 words
    seq_lens_ptr,  # [max_batch_size] int32
    tables_ptr,  # [max_batch_size, max_blocks] int32
    tokens_ptr,  # [3, tokens_stride] int64 static token buffers (ids, positions, KV slots)
    tokens_stride,
    fed_ptr,  # [max_batch_size] int64: the in-flight step's sampled tokens
    max_blocks,
    dummy_block,
    CHUNK: tl.constexpr,
    PAD_SLOT: tl.constexpr,
    PDL: tl.constexpr,
):
    grid_dependency_sync(PDL)
    row = tl.program_id(0)
    n = tl.load(raw_ptr)
    width = tl.load(raw_ptr + 2)  # header: rows, tokens (= rows), block-table width
    # pack_layout: a 4-word header, then each array on a 16-byte boundary (4 words)
    token_rows = (raw_ptr + 4).to(tl.pointer_type(tl.int64))  # [3, n]: one token per row
    seq_in = 4 + (6 * n + 3) // 4 * 4
    tables_in = seq_in + 3 * ((n + 3) // 4 * 4)
    src_in = tables_in + (n * width + 3) // 4 * 4  # token_src: -1, or the in-flight row
    if row < n:
        src = tl.load(raw_ptr + src_in + row)
        token = tl.load(token_rows + row)
        fed = tl.load(fed_ptr + tl.maximum(src, 0))
        tl.store(tokens_ptr + row, tl.where(src >= 0, fed, token))
        for k in tl.static_range(1, 3):
            tl.store(tokens_ptr + k * tokens_stride + row, tl.load(token_rows + k * n + row))
        tl.store(seq_lens_ptr + row, tl.load(raw_ptr + seq_in + row))
        for c in range(0, width, CHUNK):
            cols = c + tl.arange(0, CHUNK)
            blocks = tl.load(raw_ptr + tables_in + row * width + cols, mask=cols < width)
            tl.store(tables_ptr + row * max_blocks + cols, blocks, mask=cols < width)
    else:
        tl.store(tokens_ptr + row, 0)
        tl.store(tokens_ptr + tokens_stride + row, 0)
        tl.store(tokens_ptr + 2 * tokens_stride + row, PAD_SLOT)
        tl.store(seq_lens_ptr + row, 1)
        tl.store(tables_ptr + row * max_blocks, dummy_block)


def derive_decode_plan(
    state, tokens: torch.Tensor, fed: torch.Tensor, *, rows: int, dummy_block: int
) -> None:
    """Launch the planning kernel for the FULL decode graph of `rows` rows over `state`, the
    backend's `DecodeGraphState` (its `raw`, `seq_lens` and `block_tables`); `tokens` is the
    [3, >= rows] int64 static token buffer the model reads, `fed` the int64 buffer of the
    in-flight step's sampled tokens that fed tokens read."""
    if tokens.dtype != torch.int64 or tokens.dim() != 2 or tokens.stride(1) != 1:
        raise ValueError("the static token buffers must be [3, max_tokens] int64, row-major")
    if fed.dtype != torch.int64 or fed.dim() != 1 or fed.numel() < state.max_batch_size:
        raise ValueError("fed tokens must be an int64 buffer of max_batch_size entries")
    if rows > min(state.max_batch_size, tokens.shape[1]):
        raise ValueError(f"a graph of {rows} rows does not fit the decode graph buffers")
    _decode_plan_kernel[(rows,)](
        state.raw,
        state.seq_lens,
        state.block_tables,
        tokens,
        tokens.stride(0),
        fed,
        state.max_blocks_per_seq,
        dummy_block,
        CHUNK=CHUNK,
        PAD_SLOT=DUMMY_SLOT,
        # First in its graph, right after the pack's copy: no kernel to overlap, so no PDL.
        **launch_kwargs(state.raw.device, sys.maxsize),
    )
