"""Store the new tokens' K and V into their KV pool slots: one launch for both.

Replaces two `index_copy_` calls (one per pool) and reads K/V through their row stride, so a
K or V that is a column slice of a fused qkv projection is stored without a copy. Launched
through a `CachedLauncher`; its parameters are grouped (layer, pool, batch, constants) so the
piecewise runner can bind each group when its values are fixed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tesela.attention.triton_kernels import check_row_major
from tesela.attention.triton_kernels.launcher import (
    Args,
    CachedLauncher,
    constexpr_args,
    runtime_args,
)
from tesela.core.intmath import cdiv, next_power_of_2
from tesela.core.pdl import grid_dependency_sync

MAX_BLOCK = 1024  # elements per program: a token row wider than this spans several programs


@triton.jit
def _store_kv_kernel(
    # the layer's new K/V (bound per captured size by the piecewise runner)
    k_ptr,
    v_ptr,
    stride_k_token,
    stride_v_token,
    # the layer's pools
    k_pool_ptr,
    v_pool_ptr,
    stride_pool_slot,
    # the batch
    loc_ptr,
    WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    grid_dependency_sync(PDL)
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < WIDTH
    slot = tl.load(loc_ptr + token).to(tl.int64)
    k = tl.load(k_ptr + token * stride_k_token + offs, mask=mask)
    v = tl.load(v_ptr + token * stride_v_token + offs, mask=mask)
    tl.store(k_pool_ptr + slot * stride_pool_slot + offs, k, mask=mask)
    tl.store(v_pool_ptr + slot * stride_pool_slot + offs, v, mask=mask)


STORE_KV = CachedLauncher(_store_kv_kernel)
OPTIONS = (4, 3)  # (num_warps, num_stages): Triton's default stages


def layer_args(k: torch.Tensor, v: torch.Tensor) -> Args:
    check_row_major("k", k)
    check_row_major("v", v)
    return runtime_args(k, v, k.stride(0), v.stride(0))


def pool_args(k_pool: torch.Tensor, v_pool: torch.Tensor) -> Args:
    assert k_pool.is_contiguous() and v_pool.stride() == k_pool.stride()
    return runtime_args(k_pool, v_pool, k_pool.stride(0))


def width_args(width: int) -> tuple[Args, int]:
    """The constants of a K/V row `width` wide and the grid's second dimension."""
    block = min(next_power_of_2(width), MAX_BLOCK)
    return constexpr_args(width, block), cdiv(width, block)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    out_cache_loc: torch.Tensor,
) -> None:
    """k/v: [num_tokens, kv_heads*head_dim]; pools: [num_slots, kv_heads, head_dim];
    out_cache_loc: [>= num_tokens] slot of every token."""
    layer = layer_args(k, v)
    num_tokens, width = k.shape
    if num_tokens == 0:
        return
    assert k_pool.shape[1] * k_pool.shape[2] == width == v.shape[1]
    constants, blocks = width_args(width)
    STORE_KV(
        (num_tokens, blocks, 1),
        OPTIONS,
        layer,
        pool_args(k_pool, v_pool),
        runtime_args(out_cache_loc),
        constants,
        num_tokens=num_tokens,
    )
