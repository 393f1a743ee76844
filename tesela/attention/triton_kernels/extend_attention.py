"""Paged extend (prefill) attention: the new tokens of every row attend causally to the row.

One program per (query head, block of BLOCK_M new tokens, row). Row i's new tokens sit at
`extend_start_loc[i]..` in q/out and have absolute positions `prefix_lens[i]..seq_lens[i]-1`;
their K/V are already in the pool (stored before the launch), so the program walks KV positions
`0..` of the row through the block table with an fp32 online softmax, stopping at the last
position its queries can see. A decode row is the case of one new token, so the same kernel
serves EXTEND and MIXED batches.

In FULL graphs the grid cannot follow the batch: a tile table lists the batch's (row, query
block) pairs, and each of a fixed number of programs per head walks every P-th entry of it
(`tile_programs`), so idle programs stay few whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tesela.attention.triton_kernels import PagedAttentionShape, check_row_major, input_precision
from tesela.attention.triton_kernels.launcher import (
    Args,
    CachedLauncher,
    constexpr_args,
    runtime_args,
)
from tesela.attention.triton_kernels.store_kv import pool_args
from tesela.core.intmath import cdiv
from tesela.core.pdl import grid_dependency_sync

# Running-max start: finite, so fully masked tiles never give inf - inf.
_FLOAT_MIN = tl.constexpr(-1.0e30)


@dataclass(frozen=True)
class ExtendConfig:
    block_m: int  # new tokens per program
    block_n: int  # KV positions per tile
    num_warps: int
    num_stages: int


def extend_config(
    head_dim: int,
    dtype: torch.dtype,
    max_extend_len: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> ExtendConfig:
    """Tiles for Hopper, checked free of register spills by compiling for sm_90. Batches of
    short extends (mixed batches of decode rows) take 64-row query tiles, so a 1-token row does
    not pay for 128. fp32 takes the FMA (not tensor core) dot, whose tiles live in registers:
    small tiles, many warps."""
    if dtype == torch.float32:
        config = ExtendConfig(32, 32 if head_dim <= 64 else 16, num_warps=8, num_stages=2)
    elif head_dim <= 128:
        tile_m = 64 if max_extend_len <= 64 else 128
        config = ExtendConfig(tile_m, 64, num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    else:
        config = ExtendConfig(64, 32, num_warps=8, num_stages=1)
    return ExtendConfig(
        block_m=block_m or config.block_m,
        block_n=block_n or config.block_n,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q,
    q_pos,
    start,
    kv_end,
    table,
    k_pool_ptr,
    v_pool_ptr,
    kv_col,
    d_mask,
    scale_log2,
    stride_pool_slot,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    WINDOW: tl.constexpr,
    EDGE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One KV tile of the online softmax. EDGE: the tile may hold positions that some query
    must not see (past the diagonal, outside the window, past the row); other tiles skip the
    masking, which is most of a long prefill."""
    pos = start + tl.arange(0, BLOCK_N)
    n_mask = pos < kv_end
    page = tl.load(table + pos // PAGE_SIZE, mask=n_mask, other=0)
    slot = page.to(tl.int64) * PAGE_SIZE + pos % PAGE_SIZE
    kv_offs = slot[:, None] * stride_pool_slot + kv_col[None, :]
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_pool_ptr + kv_offs, mask=kv_mask, other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    if EDGE:
        visible = n_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        if WINDOW > 0:
            visible = visible & (pos[None, :] > q_pos[:, None] - WINDOW)
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_pool_ptr + kv_offs, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_block(
    q_ptr, out_ptr, stride_q_token, stride_out_token, scale_log2,
    k_pool_ptr, v_pool_ptr, stride_pool_slot,
    block_tables_ptr, seq_lens_ptr, prefix_lens_ptr, extend_start_loc_ptr,
    stride_table_row, head, row, q_begin,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Query block `q_begin` of `row` for one head: the causal walk over the row's KV."""
    seq_len = tl.load(seq_lens_ptr + row)
    prefix = tl.load(prefix_lens_ptr + row)
    extend_len = seq_len - prefix
    # The grid covers the longest row; blocks past a row's end do nothing.
    if q_begin < extend_len:
        offs_m = q_begin + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < extend_len
        d_mask = offs_d < HEAD_DIM
        tokens = (tl.load(extend_start_loc_ptr + row) + offs_m).to(tl.int64)
        q_offs = tokens[:, None] * stride_q_token + head * HEAD_DIM + offs_d[None, :]
        q = tl.load(q_ptr + q_offs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        q_pos = prefix + offs_m

        # Causal: no query of this block sees past its last position. Whole tiles before its
        # first position are seen by every query (without a window): no masking there.
        kv_end = tl.minimum(seq_len, prefix + q_begin + BLOCK_M)
        kv_begin = q_begin * 0
        interior_end = (prefix + q_begin) // BLOCK_N * BLOCK_N
        if WINDOW > 0:
            kv_begin = tl.maximum(prefix + q_begin - WINDOW + 1, 0)
            interior_end = kv_begin

        table = block_tables_ptr + row.to(tl.int64) * stride_table_row
        kv_col = (head // GROUP) * HEAD_DIM + offs_d
        m_i = tl.full([BLOCK_M], _FLOAT_MIN, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start in range(kv_begin, interior_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, q_pos, start, kv_end, table, k_pool_ptr, v_pool_ptr,
                kv_col, d_mask, scale_log2, stride_pool_slot,
                BLOCK_N, PAGE_SIZE, WINDOW, False, PRECISION,
            )  # fmt: skip
        for start in range(interior_end, kv_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, q_pos, start, kv_end, table, k_pool_ptr, v_pool_ptr,
                kv_col, d_mask, scale_log2, stride_pool_slot,
                BLOCK_N, PAGE_SIZE, WINDOW, True, PRECISION,
            )  # fmt: skip

        # Every real query sees at least itself, so l_i > 0 on the rows that are stored.
        out = acc / tl.where(m_mask, l_i, 1.0)[:, None]
        out_offs = tokens[:, None] * stride_out_token + head * HEAD_DIM + offs_d[None, :]
        tl.store(
            out_ptr + out_offs,
            out.to(out_ptr.dtype.element_ty),
            mask=m_mask[:, None] & d_mask[None, :],
        )


@triton.jit
def _extend_kernel(
    # the layer (bound per captured size by the piecewise runner)
    q_ptr,
    out_ptr,
    stride_q_token,
    stride_out_token,
    scale_log2,
    # the layer's pools
    k_pool_ptr,
    v_pool_ptr,
    stride_pool_slot,
    # the batch
    block_tables_ptr,
    seq_lens_ptr,
    prefix_lens_ptr,
    extend_start_loc_ptr,
    tiles_ptr,
    num_tiles,
    stride_table_row,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILED: tl.constexpr,
    # the backend's shape
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    grid_dependency_sync(PDL)
    # Heads vary fastest, so the query heads of one KV head run together and share its K/V
    # tiles in L2; query blocks go last-first, so the longest causal walks start first.
    head = tl.program_id(0)
    if TILED:
        # FULL graphs: the grid is fixed per captured size; program p walks the tile table's
        # entries p, p + P, ... (P programs per head), each a (row, query block), until the
        # first absent one (-1: the batch's tiles come first). P covers the full query blocks
        # of the captured size plus a few partial ones, so a batch of many short rows loops
        # and a batch of few rows leaves no wave of idle programs.
        tile = tl.program_id(1)
        row = tl.load(tiles_ptr + 2 * tile, mask=tile < num_tiles, other=-1)
        while row >= 0:
            _attend_block(
                q_ptr, out_ptr, stride_q_token, stride_out_token, scale_log2,
                k_pool_ptr, v_pool_ptr, stride_pool_slot,
                block_tables_ptr, seq_lens_ptr, prefix_lens_ptr, extend_start_loc_ptr,
                stride_table_row, head, row, tl.load(tiles_ptr + 2 * tile + 1),
                BLOCK_M, BLOCK_N, GROUP, HEAD_DIM, BLOCK_D, PAGE_SIZE, WINDOW, PRECISION,
            )  # fmt: skip
            tile += tl.num_programs(1)
            row = tl.load(tiles_ptr + 2 * tile, mask=tile < num_tiles, other=-1)
    else:
        _attend_block(
            q_ptr, out_ptr, stride_q_token, stride_out_token, scale_log2,
            k_pool_ptr, v_pool_ptr, stride_pool_slot,
            block_tables_ptr, seq_lens_ptr, prefix_lens_ptr, extend_start_loc_ptr,
            stride_table_row, head, tl.program_id(2),
            (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M,
            BLOCK_M, BLOCK_N, GROUP, HEAD_DIM, BLOCK_D, PAGE_SIZE, WINDOW, PRECISION,
        )  # fmt: skip


def kernels_interpreted() -> bool:
    """True when triton.jit built interpreter functions (TRITON_INTERPRET=1 when triton was
    imported): the kernels then run, slowly, on CPU tensors."""
    return not isinstance(_extend_kernel, triton.runtime.JITFunction)


def extend_attention(
    q: torch.Tensor,
    out: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_start_loc: torch.Tensor,
    *,
    shape: PagedAttentionShape,
    max_extend_len: int,
    config: ExtendConfig,
    tiles: torch.Tensor | None = None,
) -> None:
    """q/out: [num_tokens, heads*head_dim]; pools: [num_slots, kv_heads, head_dim];
    seq_lens/prefix_lens/extend_start_loc: [batch] int32; block_tables: [batch, max_blocks].

    With a tile table (`tiles`: [num_tiles, 2] int32 (row, first query), see `tile_table`)
    the grid is (heads, `tile_programs`) whatever the batch, so a CUDA graph can capture it."""
    layer = layer_args(q, out, shape)
    batch_size = seq_lens.shape[0]
    if batch_size == 0 or max_extend_len == 0:
        return
    EXTEND(
        extend_grid(shape, config, max_extend_len, batch_size, tiles),
        (config.num_warps, config.num_stages),
        layer,
        pool_args(k_pool, v_pool),
        batch_args(block_tables, seq_lens, prefix_lens, extend_start_loc, tiles),
        tile_args(config, tiles is not None),
        shape_args(shape, q.dtype),
        num_tokens=q.shape[0],
    )


EXTEND = CachedLauncher(_extend_kernel)


def layer_args(q: torch.Tensor, out: torch.Tensor, shape: PagedAttentionShape) -> Args:
    check_row_major("q", q)
    check_row_major("out", out)
    return runtime_args(q, out, q.stride(0), out.stride(0), shape.scale_log2)


def batch_args(block_tables, seq_lens, prefix_lens, extend_start_loc, tiles) -> Args:
    if tiles is None:
        tiles, num_tiles = seq_lens, 0  # not read
    else:
        assert tiles.dim() == 2 and tiles.shape[1] == 2 and tiles.is_contiguous()
        num_tiles = tiles.shape[0]
    return runtime_args(
        block_tables, seq_lens, prefix_lens, extend_start_loc, tiles, num_tiles,
        block_tables.stride(0),
    )  # fmt: skip


def tile_args(config: ExtendConfig, tiled: bool) -> Args:
    return constexpr_args(config.block_m, config.block_n, tiled)


def shape_args(shape: PagedAttentionShape, dtype: torch.dtype) -> Args:
    return constexpr_args(
        shape.group_size,
        shape.head_dim,
        shape.block_d,
        shape.page_size,
        shape.window,
        input_precision(dtype),
    )


def extend_grid(
    shape: PagedAttentionShape,
    config: ExtendConfig,
    max_extend_len: int,
    batch_size: int,
    tiles: torch.Tensor | None,
) -> tuple[int, int, int]:
    """With a tile table the grid is (heads, tile programs) whatever the batch (FULL graphs:
    `max_extend_len` is the captured size)."""
    if tiles is not None:
        return (shape.num_heads, tile_programs(tiles.shape[0], max_extend_len, config.block_m), 1)
    return (shape.num_heads, cdiv(max_extend_len, config.block_m), batch_size)


PARTIAL_TILE_PROGRAMS = 16  # per head, beyond one per full query block of the captured size


def tile_programs(num_tiles: int, num_tokens: int, block_m: int) -> int:
    """Programs per head walking a tile table of `num_tiles` entries: one per full query block
    `num_tokens` tokens make, plus PARTIAL_TILE_PROGRAMS for rows' partial blocks. A batch with
    more partial blocks (many short rows) loops; the table's worst case (every row partial)
    would launch mostly idle programs for every other batch."""
    return min(num_tiles, num_tokens // block_m + PARTIAL_TILE_PROGRAMS)


def max_tiles(num_tokens: int, max_rows: int, block_m: int) -> int:
    """Query blocks any batch of `num_tokens` tokens in at most `max_rows` rows can need:
    sum(ceil(len_i / block_m)) <= num_tokens // block_m + rows."""
    return num_tokens // block_m + min(max_rows, num_tokens)


def tile_table(extend_lens: list[int], prefix_lens: list[int], block_m: int) -> list[int]:
    """The flat (row, first query) pairs of every query block of a batch, longest causal walk
    first (as the untiled grid orders them). Rows of length 0 have none."""
    tiles = sorted(
        (
            (prefix + start, row, start)
            for row, (length, prefix) in enumerate(zip(extend_lens, prefix_lens, strict=True))
            for start in range(0, length, block_m)
        ),
        reverse=True,
    )
    return [value for _, row, start in tiles for value in (row, start)]
