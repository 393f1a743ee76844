"""Store the new tokens' K and V into their KV pool slots: one launch for both.

Replaces two `index_copy_` calls (one per pool) and reads K/V through their row stride, so a
K or V that is a column slice of a fused qkv projection is stored without a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tesela.attention.triton_kernels import check_row_major, next_power_of_2

MAX_BLOCK = 1024  # elements per program: a token row wider than this spans several programs


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_pool_ptr,
    v_pool_ptr,
    loc_ptr,
    stride_k_token,
    stride_v_token,
    stride_pool_slot,
    WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < WIDTH
    slot = tl.load(loc_ptr + token).to(tl.int64)
    k = tl.load(k_ptr + token * stride_k_token + offs, mask=mask)
    v = tl.load(v_ptr + token * stride_v_token + offs, mask=mask)
    tl.store(k_pool_ptr + slot * stride_pool_slot + offs, k, mask=mask)
    tl.store(v_pool_ptr + slot * stride_pool_slot + offs, v, mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    out_cache_loc: torch.Tensor,
) -> None:
    """k/v: [num_tokens, kv_heads*head_dim]; pools: [num_slots, kv_heads, head_dim];
    out_cache_loc: [>= num_tokens] slot of every token."""
    check_row_major("k", k)
    check_row_major("v", v)
    num_tokens, width = k.shape
    if num_tokens == 0:
        return
    assert k_pool.is_contiguous() and v_pool.stride() == k_pool.stride()
    assert k_pool.shape[1] * k_pool.shape[2] == width == v.shape[1]
    block = min(next_power_of_2(width), MAX_BLOCK)
    grid = (num_tokens, triton.cdiv(width, block))
    _store_kv_kernel[grid](
        k,
        v,
        k_pool,
        v_pool,
        out_cache_loc,
        k.stride(0),
        v.stride(0),
        k_pool.stride(0),
        WIDTH=width,
        BLOCK=block,
        num_warps=4,
    )
