"""Triton kernels of the fused MoE: a grouped GEMM over expert-sorted blocks and a per-pair GEMV.

Both compute, for (token, expert) pairs, C[pair] = A[row] @ W[expert]^T with fp32 accumulation,
and optionally
- GATED: W holds the gate rows then the up rows (W is [E, 2N, K]); the program computes both
  halves of its N tile and stores silu(gate) * up, so the [pairs, 2N] activation never exists;
- MUL_WEIGHT: the result is scaled by the pair's router weight (the down projection).
`A_ROWS_PER_PAIR` is top_k for the first GEMM (A is the hidden states, one row per token, so
row = pair // top_k) and 1 for the second (A is the intermediate, one row per pair).

`grouped_gemm_kernel` (prefill): one program per (block of BLOCK_M sorted pairs, N tile); a
block holds pairs of one expert (see align.py), so each program streams one expert's weights.
`pair_gemv_kernel` (decode): one program per (pair, N tile), no sorting at all; pairs whose
expert is out of range, or whose token is past the batch's real tokens (`num_valid_tokens`,
read on the device: graph padding), load nothing and store zeros.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _silu_mul(gate, up):
    return gate / (1.0 + tl.exp(-gate)) * up


@triton.jit
def grouped_gemm_kernel(
    a_ptr, w_ptr, c_ptr, topk_weights_ptr,
    sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_pairs_ptr,
    num_pairs, N, K,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn,
    A_ROWS_PER_PAIR: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.num_programs(0) // num_pid_n
    # Grouped ordering: neighbouring programs share weight tiles in L2.
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size
    if pid_m * BLOCK_M >= tl.load(num_padded_pairs_ptr):
        return  # past the last expert's padded blocks: the grid is sized for the worst case
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair_ids = tl.load(sorted_pair_ids_ptr + offs_m)
    pair_mask = pair_ids < num_pairs
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    rows = (pair_ids // A_ROWS_PER_PAIR).to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=pair_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(a, w)
        if GATED:
            w_up = tl.load(
                w_ptrs + N * stride_wn, mask=k_mask[:, None] & n_mask[None, :], other=0.0
            )
            acc_up += tl.dot(a, w_up)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if GATED:
        acc = _silu_mul(acc, acc_up)
    if MUL_WEIGHT:
        weights = tl.load(topk_weights_ptr + pair_ids, mask=pair_mask, other=0.0)
        acc = acc * weights.to(tl.float32)[:, None]
    c_ptrs = c_ptr + pair_ids.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=pair_mask[:, None] & n_mask[None, :])


@triton.jit
def pair_gemv_kernel(
    a_ptr, w_ptr, c_ptr, topk_weights_ptr, topk_ids_ptr, num_valid_tokens_ptr,
    num_experts, top_k, N, K,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn,
    A_ROWS_PER_PAIR: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    HAS_NUM_VALID: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(topk_ids_ptr + pair).to(tl.int64)
    # A padding token's pair loads nothing (masked) and stores zeros: it costs no bandwidth.
    valid = (expert >= 0) & (expert < num_experts)
    if HAS_NUM_VALID:
        valid = valid & (pair // top_k < tl.load(num_valid_tokens_ptr))
    expert = tl.where(valid, expert, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = (offs_n < N) & valid
    offs_k = tl.arange(0, BLOCK_K)
    row = pair // A_ROWS_PER_PAIR
    a_ptrs = a_ptr + row * stride_am + offs_k * stride_ak
    w_ptrs = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=k_mask & valid, other=0.0).to(tl.float32)
        mask = n_mask[:, None] & k_mask[None, :]
        w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(w * a[None, :], axis=1)
        if GATED:
            w_up = tl.load(w_ptrs + N * stride_wn, mask=mask, other=0.0).to(tl.float32)
            acc_up += tl.sum(w_up * a[None, :], axis=1)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if GATED:
        acc = _silu_mul(acc, acc_up)
    if MUL_WEIGHT:
        acc = acc * tl.load(topk_weights_ptr + pair).to(tl.float32)
    acc = tl.where(valid, acc, 0.0)
    c_ptrs = c_ptr + pair.to(tl.int64) * stride_cm + offs_n * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=offs_n < N)
