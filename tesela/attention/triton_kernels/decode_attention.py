"""Paged decode attention with split-KV (flash-decoding): one query token per row.

Stage 1 runs one program per (row, KV head, KV split): it loads the query heads of that KV
head together (GQA: every K/V tile is read once for the whole group, which is what makes decode
bandwidth-bound rather than bound by repeated reads), walks its share of the row's context
through the block table and writes a normalized partial output plus its log-sum-exp. Stage 2
merges the splits of each (row, head).

The split count launched is fixed by the host (so a CUDA graph can capture it); each row then
uses only as many of those splits as its own length needs (`min_split_len` tokens at least per
split, each a whole number of KV tiles), computed on the device from its sequence length. Short
rows of a graph batch (and padded rows) therefore cost one small split, not the captured
maximum, and nothing is read on the host.

With an entry table (`entry_rows`, `entry_tokens`), program i serves the row `entry_rows[i]`
whose query is token `entry_tokens[i]`: the decode rows of a mixed batch, in a FULL mixed graph
whose grid is fixed. Entries with row -1 are absent and do nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tesela.attention.triton_kernels import (
    MIN_DOT_DIM,
    PagedAttentionShape,
    check_row_major,
    input_precision,
)
from tesela.attention.triton_kernels.launcher import (
    Args,
    CachedLauncher,
    constexpr_args,
    runtime_args,
)
from tesela.attention.triton_kernels.store_kv import pool_args
from tesela.core.intmath import cdiv, next_power_of_2
from tesela.core.pdl import grid_dependency_sync

# Running-max start: finite, so fully masked tiles never give inf - inf.
_FLOAT_MIN = tl.constexpr(-1.0e30)


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int  # KV positions per tile
    num_warps: int
    num_stages: int
    block_s: int  # splits the merge reads per (row, head): >= any split count launched


def decode_config(
    head_dim: int, dtype: torch.dtype, max_kv_splits: int, block_n: int | None = None
) -> DecodeConfig:
    """Tiles for Hopper, checked free of register spills by compiling for sm_90: a [BLOCK_N,
    head_dim] K and V tile double-buffered per program. fp32 takes the FMA (not tensor core)
    dot, whose tiles live in registers: more warps share them."""
    block_s = max(next_power_of_2(max_kv_splits), 2)
    if dtype == torch.float32:
        return DecodeConfig(block_n or 32, num_warps=8, num_stages=2, block_s=block_s)
    default_n = 64 if head_dim <= 128 else 32
    return DecodeConfig(block_n or default_n, num_warps=4, num_stages=2, block_s=block_s)


def num_kv_splits(
    batch_size: int,
    num_kv_heads: int,
    max_seq_len: int,
    *,
    max_kv_splits: int,
    min_split_len: int,
    target_programs: int,
) -> int:
    """Splits to launch: enough (row, KV head, split) programs to fill the GPU, no more splits
    than the longest row can give `min_split_len` tokens each, and at most `max_kv_splits`."""
    by_length = cdiv(max(max_seq_len, 1), min_split_len)
    by_occupancy = cdiv(target_programs, batch_size * num_kv_heads)
    return max(1, min(max_kv_splits, by_length, by_occupancy))


@triton.jit
def _row_splits(seq_len, num_kv_splits, min_split_len, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """The KV range [kv_start, seq_len) of a row, the length of each split and how many
    splits it uses (0 for an absent entry, whose length is 0). A split's length is a whole
    number of BLOCK_N tiles: a split of 86 tokens would read two tiles, as one of 128 does (so
    3 splits of 86 cost 6 tiles where 2 of 128 cost 4); the row then uses fewer splits than it
    may, none of them empty."""
    kv_start = seq_len * 0
    if WINDOW > 0:
        kv_start = tl.maximum(seq_len - WINDOW, 0)
    kv_len = seq_len - kv_start
    splits = tl.minimum(num_kv_splits, tl.cdiv(kv_len, min_split_len))
    tiles = tl.maximum(tl.cdiv(tl.cdiv(kv_len, tl.maximum(splits, 1)), BLOCK_N), 1)
    split_len = tiles * BLOCK_N
    return kv_start, split_len, tl.cdiv(kv_len, split_len)


@triton.jit
def _entry(entry, entry_rows_ptr, entry_tokens_ptr, seq_lens_ptr, INDIRECT: tl.constexpr):
    """The row, query token and sequence length of program `entry` (length 0: absent)."""
    if INDIRECT:
        row = tl.load(entry_rows_ptr + entry)
        token = tl.load(entry_tokens_ptr + entry)
    else:
        row = entry
        token = entry
    seq_len = tl.load(seq_lens_ptr + tl.maximum(row, 0))
    return row, token, tl.where(row >= 0, seq_len, 0)


# The split count and the table / scratch strides are launch values, not compile keys: the
# eager warmup before a graph capture (planned for 1-token rows, one split, a 1-column table)
# must compile the very kernels the capture launches, or the capture itself would compile and
# load a kernel module mid-capture. (Triton specializes ints equal to 1 or divisible by 16.)
_LAUNCH_VALUES = (
    "stride_table_row",
    "stride_po_row",
    "stride_po_head",
    "stride_lse_row",
    "stride_lse_head",
    "num_kv_splits",
)


@triton.jit(do_not_specialize=_LAUNCH_VALUES)
def _decode_stage1_kernel(
    # the layer
    q_ptr,
    stride_q_token,
    scale_log2,
    # the layer's pools
    k_pool_ptr,
    v_pool_ptr,
    stride_pool_slot,
    # the batch
    block_tables_ptr,
    seq_lens_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    entry_rows_ptr,
    entry_tokens_ptr,
    stride_table_row,
    stride_po_row,
    stride_po_head,
    stride_po_split,
    stride_lse_row,
    stride_lse_head,
    num_kv_splits,
    min_split_len,
    INDIRECT: tl.constexpr,
    # the backend's shape
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    # The batch's rows are written before the forward: loaded before the wait.
    entry = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    row, token, seq_len = _entry(entry, entry_rows_ptr, entry_tokens_ptr, seq_lens_ptr, INDIRECT)
    kv_start, split_len, splits = _row_splits(
        seq_len, num_kv_splits, min_split_len, WINDOW, BLOCK_N
    )
    grid_dependency_sync(PDL)
    # Splits beyond what this row uses are never read by stage 2: nothing to do.
    if split < splits:
        split_start = kv_start + split * split_len
        split_end = tl.minimum(split_start + split_len, seq_len)

        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        heads = kv_head * GROUP + offs_h
        h_mask = offs_h < GROUP
        d_mask = offs_d < HEAD_DIM
        q_offs = token.to(tl.int64) * stride_q_token + heads[:, None] * HEAD_DIM + offs_d[None, :]
        q = tl.load(q_ptr + q_offs, mask=h_mask[:, None] & d_mask[None, :], other=0.0)

        table = block_tables_ptr + row.to(tl.int64) * stride_table_row
        kv_col = kv_head * HEAD_DIM + offs_d
        m_i = tl.full([BLOCK_H], _FLOAT_MIN, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for start in range(split_start, split_end, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            n_mask = pos < split_end
            page = tl.load(table + pos // PAGE_SIZE, mask=n_mask, other=0)
            slot = page.to(tl.int64) * PAGE_SIZE + pos % PAGE_SIZE
            kv_offs = slot[:, None] * stride_pool_slot + kv_col[None, :]
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_pool_ptr + kv_offs, mask=kv_mask, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_pool_ptr + kv_offs, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        # Every split a row uses holds a position (_row_splits); were one empty, l_i == 0 would
        # store a zero output with weight exp2(-inf) = 0, which stage 2 adds as nothing.
        has_kv = l_i > 0
        out = acc / tl.where(has_kv, l_i, 1.0)[:, None]
        lse = tl.where(has_kv, m_i + tl.log2(tl.where(has_kv, l_i, 1.0)), float("-inf"))
        po = entry.to(tl.int64) * stride_po_row + heads * stride_po_head + split * stride_po_split
        tl.store(
            partial_out_ptr + po[:, None] + offs_d[None, :],
            out,
            mask=h_mask[:, None] & d_mask[None, :],
        )
        lse_offs = entry.to(tl.int64) * stride_lse_row + heads * stride_lse_head + split
        tl.store(partial_lse_ptr + lse_offs, lse, mask=h_mask)


@triton.jit(do_not_specialize=_LAUNCH_VALUES[1:])
def _decode_stage2_kernel(
    # the layer
    out_ptr,
    stride_out_token,
    # the batch
    partial_out_ptr,
    partial_lse_ptr,
    seq_lens_ptr,
    entry_rows_ptr,
    entry_tokens_ptr,
    stride_po_row,
    stride_po_head,
    stride_po_split,
    stride_lse_row,
    stride_lse_head,
    num_kv_splits,
    min_split_len,
    INDIRECT: tl.constexpr,
    # the backend's shape
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    WINDOW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    entry = tl.program_id(0)
    head = tl.program_id(1)
    # The batch's rows are written before the forward: loaded before the wait.
    row, token, seq_len = _entry(entry, entry_rows_ptr, entry_tokens_ptr, seq_lens_ptr, INDIRECT)
    _, _, splits = _row_splits(seq_len, num_kv_splits, min_split_len, WINDOW, BLOCK_N)
    grid_dependency_sync(PDL)
    # An absent entry (seq_len 0) has no split: nothing to merge.
    if splits > 0:
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_mask = offs_s < splits
        d_mask = offs_d < HEAD_DIM

        lse_base = entry.to(tl.int64) * stride_lse_row + head * stride_lse_head
        lse = tl.load(partial_lse_ptr + lse_base + offs_s, mask=s_mask, other=float("-inf"))
        # Split 0 is never empty (seq_len >= 1), so the max is finite.
        weight = tl.exp2(lse - tl.max(lse, 0))
        po_base = entry.to(tl.int64) * stride_po_row + head * stride_po_head
        po_offs = po_base + offs_s[:, None] * stride_po_split + offs_d[None, :]
        parts = tl.load(
            partial_out_ptr + po_offs, mask=s_mask[:, None] & d_mask[None, :], other=0.0
        )
        out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
        out_offs = token.to(tl.int64) * stride_out_token + head * HEAD_DIM + offs_d
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def decode_attention(
    q: torch.Tensor,
    out: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    partial_out: torch.Tensor,
    partial_lse: torch.Tensor,
    *,
    shape: PagedAttentionShape,
    num_kv_splits: int,
    min_split_len: int,
    config: DecodeConfig,
    entry_rows: torch.Tensor | None = None,
    entry_tokens: torch.Tensor | None = None,
) -> None:
    """q/out: [batch, heads*head_dim], token i = row i. seq_lens/block_tables: [>= batch] rows
    of the pool. partial_out: [>= batch, heads, >= num_kv_splits, head_dim] fp32 scratch,
    partial_lse: [>= batch, heads, >= num_kv_splits] fp32 scratch. No allocation, no host
    sync: safe to capture in a CUDA graph.

    With an entry table (`entry_rows`, `entry_tokens`: [entries] int32; module docstring) the
    grid has one program row per entry and q/out may hold any number of tokens."""
    layer1, layer2 = layer_args(q, out, shape)
    batch_size = entry_rows.shape[0] if entry_rows is not None else q.shape[0]
    if batch_size == 0:
        return
    batch1, batch2 = batch_args(
        block_tables,
        seq_lens,
        partial_out,
        partial_lse,
        entry_rows,
        entry_tokens,
        num_kv_splits=num_kv_splits,
        min_split_len=min_split_len,
        config=config,
    )
    shape1, shape2 = shape_args(shape, config, q.dtype)
    pools = pool_args(k_pool, v_pool)
    stage1, stage2 = decode_grids(shape, batch_size, num_kv_splits)
    options = (config.num_warps, config.num_stages)
    STAGE1(stage1, options, layer1, pools, *batch1, shape1, num_tokens=q.shape[0])
    STAGE2(stage2, STAGE2_OPTIONS, layer2, *batch2, shape2, num_tokens=q.shape[0])


STAGE1 = CachedLauncher(_decode_stage1_kernel)
STAGE2 = CachedLauncher(_decode_stage2_kernel)
STAGE2_OPTIONS = (4, 3)  # (num_warps, num_stages): Triton's default stages


def layer_args(q: torch.Tensor, out: torch.Tensor, shape: PagedAttentionShape):
    """The layer groups of stage 1 (q) and stage 2 (out)."""
    check_row_major("q", q)
    check_row_major("out", out)
    return runtime_args(q, q.stride(0), shape.scale_log2), runtime_args(out, out.stride(0))


def batch_args(
    block_tables, seq_lens, partial_out, partial_lse, entry_rows, entry_tokens, *,
    num_kv_splits: int, min_split_len: int, config: DecodeConfig,
) -> tuple[tuple[Args, Args], tuple[Args, Args]]:  # fmt: skip
    """The batch groups (runtime, constexpr) of stage 1 and stage 2."""
    indirect = entry_rows is not None
    if not indirect:
        entry_rows = entry_tokens = seq_lens  # not read
    assert partial_out.stride(-1) == 1 and partial_lse.stride(-1) == 1
    assert partial_out.shape[2] >= num_kv_splits and partial_lse.shape[2] >= num_kv_splits
    assert num_kv_splits <= config.block_s
    scratch = (
        partial_out.stride(0),
        partial_out.stride(1),
        partial_out.stride(2),
        partial_lse.stride(0),
        partial_lse.stride(1),
        num_kv_splits,
        min_split_len,
    )
    entries = (entry_rows, entry_tokens)
    stage1 = runtime_args(
        block_tables, seq_lens, partial_out, partial_lse, *entries, block_tables.stride(0),
        *scratch,
    )  # fmt: skip
    stage2 = runtime_args(partial_out, partial_lse, seq_lens, *entries, *scratch)
    indirect_args = constexpr_args(indirect)
    return (stage1, indirect_args), (stage2, indirect_args)


def shape_args(shape: PagedAttentionShape, config: DecodeConfig, dtype: torch.dtype):
    """The constexpr groups of stage 1 and stage 2."""
    stage1 = constexpr_args(
        shape.group_size,
        max(next_power_of_2(shape.group_size), MIN_DOT_DIM),
        shape.head_dim,
        shape.block_d,
        config.block_n,
        shape.page_size,
        shape.window,
        input_precision(dtype),
    )
    stage2 = constexpr_args(
        shape.head_dim, shape.block_d, config.block_s, shape.window, config.block_n
    )
    return stage1, stage2


def decode_grids(shape: PagedAttentionShape, entries: int, num_kv_splits: int):
    return (entries, shape.num_kv_heads, num_kv_splits), (entries, shape.num_heads, 1)
