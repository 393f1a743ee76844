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
`pair_gemv_kernel` (decode gate/up): one program per (pair, N tile), no sorting at all; pairs whose
expert is out of range, or whose token is past the batch's real tokens (`num_valid_tokens`,
read on the device: graph padding), load nothing and store zeros.
`down_sum_gemv_kernel` (decode down projection): one program per (token, N tile) holds the
token's k pairs side by side ([next_pow2(k), BLOCK_N, BLOCK_K] weight tiles per K step),
accumulates each pair's partial in fp32 registers, and writes the weighted sum over the k
pairs, the token's [H] output, once: no zeroed [M*k, H] buffer and no separate sum over the
top-k; the fixed reduction order makes it deterministic. Its grid has M (not M*k) rows, so its
tuned BLOCK_N is narrower than the per-pair kernel's.
`router_topk_kernel`: softmax, top-k and renormalisation of one token's router logits in one
program (see router.py for the rule it reproduces).
`router_gemm_topk_kernel`: the router GEMM and that rule in one launch. Programs (e-block,
token) each compute BLOCK_E logits into a scratch row, then take a ticket on the token's
counter; the one that draws the last ticket runs the rule (`_route_token`, shared with
`router_topk_kernel`) on the whole row and resets the counter to zero.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tesela.core.pdl import grid_dependency_sync


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
    PDL: tl.constexpr,
):  # fmt: skip
    grid_dependency_sync(PDL)
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
    PDL: tl.constexpr,
):  # fmt: skip
    grid_dependency_sync(PDL)
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


@triton.jit
def down_sum_gemv_kernel(
    a_ptr, w_ptr, out_ptr, topk_weights_ptr, topk_ids_ptr, num_valid_tokens_ptr,
    num_experts, N, K,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
    TOP_K: tl.constexpr, HAS_NUM_VALID: tl.constexpr,
    BLOCK_TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    grid_dependency_sync(PDL)
    token = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    # The token's k pairs side by side: each K step loads all k experts' [BLOCK_N, BLOCK_K]
    # tiles at once, so a program keeps k tiles of loads in flight (what k programs did).
    slots = tl.arange(0, BLOCK_TOPK)
    pairs = token * TOP_K + slots
    slot_mask = slots < TOP_K
    experts = tl.load(topk_ids_ptr + pairs, mask=slot_mask, other=-1).to(tl.int64)
    # A padding token's or an out-of-range expert's pair loads nothing and adds nothing (after a
    # grouped gate/up its intermediate row was never written).
    valid = slot_mask & (experts >= 0) & (experts < num_experts)
    if HAS_NUM_VALID:
        valid = valid & (token < tl.load(num_valid_tokens_ptr))
    experts = tl.where(valid, experts, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    nw_mask = valid[:, None, None] & (offs_n < N)[None, :, None]
    a_ptrs = a_ptr + pairs[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = (w_ptr + experts[:, None, None] * stride_we + offs_n[None, :, None] * stride_wn
              + offs_k[None, None, :] * stride_wk)  # fmt: skip
    partial = tl.zeros((BLOCK_TOPK, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=nw_mask & k_mask[None, None, :], other=0.0)
        partial += tl.sum(w.to(tl.float32) * a.to(tl.float32)[:, None, :], axis=2)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    weights = tl.load(topk_weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
    # The weighted sum over the k slots, in fp32, in a fixed order: one rounding, deterministic.
    acc = tl.sum(tl.where(valid[:, None], partial * weights[:, None], 0.0), axis=0)
    out_ptrs = out_ptr + token * stride_om + offs_n * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _route_token(
    logits, token, topk_weights_ptr, topk_ids_ptr, num_experts,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_TOPK: tl.constexpr,
):  # fmt: skip
    """The router rule on one token's [BLOCK_E] logits (lanes >= num_experts hold -inf): writes
    its k weights and expert ids. Shared by both router kernels, so they pick the same experts."""
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < num_experts
    # Softmax in fp32 over all E experts, as torch.softmax(..., dtype=torch.float32) does.
    numerators = tl.exp(logits.to(tl.float32) - tl.max(logits.to(tl.float32), axis=0))
    probs = numerators / tl.sum(numerators, axis=0)
    probs = tl.where(e_mask, probs, -1.0)  # lanes past E are never picked (probs >= 0)
    offs_topk = tl.arange(0, BLOCK_TOPK)
    weights = tl.zeros((BLOCK_TOPK,), dtype=tl.float32)
    ids = tl.zeros((BLOCK_TOPK,), dtype=tl.int64)
    for slot in tl.static_range(TOP_K):
        best = tl.max(probs, axis=0)
        # Ties go to the lowest expert index (a fixed rule; torch.topk documents none).
        expert = tl.min(tl.where(probs == best, offs_e, BLOCK_E), axis=0)
        weights = tl.where(offs_topk == slot, best, weights)
        ids = tl.where(offs_topk == slot, expert.to(tl.int64), ids)
        probs = tl.where(offs_e == expert, -1.0, probs)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=0)  # lanes past TOP_K hold 0
    out = token * TOP_K + offs_topk
    mask = offs_topk < TOP_K
    tl.store(topk_weights_ptr + out, weights.to(topk_weights_ptr.dtype.element_ty), mask=mask)
    tl.store(topk_ids_ptr + out, ids, mask=mask)


@triton.jit
def router_topk_kernel(
    logits_ptr, topk_weights_ptr, topk_ids_ptr, num_experts, stride_lm,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_TOPK: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    grid_dependency_sync(PDL)
    token = tl.program_id(0).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    logits = tl.load(
        logits_ptr + token * stride_lm + offs_e, mask=offs_e < num_experts, other=-float("inf")
    )
    _route_token(logits, token, topk_weights_ptr, topk_ids_ptr, num_experts,
                 TOP_K, RENORMALIZE, BLOCK_E, BLOCK_TOPK)  # fmt: skip


@triton.jit
def _round_to_activation_dtype(x, dtype: tl.constexpr):
    """fp32 `x` rounded to `dtype` (nearest, ties to even), kept in fp32."""
    if dtype == tl.bfloat16:
        # bf16 is fp32's top 16 bits: round them in integer arithmetic. Same result as the GPU's
        # cvt.rn.bf16.f32, and also under the Triton interpreter, whose cast truncates.
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        rounded = bits.to(tl.float32, bitcast=True)
    else:
        rounded = x.to(dtype).to(tl.float32)
    return rounded


@triton.jit
def router_gemm_topk_kernel(
    x_ptr, w_ptr, logits_ptr, counters_ptr, topk_weights_ptr, topk_ids_ptr,
    num_experts, hidden_size, stride_xm, stride_we,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_ALL_E: tl.constexpr, BLOCK_TOPK: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    grid_dependency_sync(PDL)
    pid_e = tl.program_id(0)
    token = tl.program_id(1).to(tl.int64)
    # The GEMM part: BLOCK_E logits of one token, fp32 over H in a fixed order.
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = offs_e < num_experts
    offs_h = tl.arange(0, BLOCK_H)
    x_ptrs = x_ptr + token * stride_xm + offs_h
    w_ptrs = w_ptr + offs_e.to(tl.int64)[:, None] * stride_we + offs_h[None, :]
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for h in range(0, tl.cdiv(hidden_size, BLOCK_H)):
        h_mask = offs_h < hidden_size - h * BLOCK_H
        x = tl.load(x_ptrs, mask=h_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=e_mask[:, None] & h_mask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        x_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    # Rounded to the activation dtype, as the gate Linear's output is: the rule sees its logits.
    logits = _round_to_activation_dtype(acc, x_ptr.dtype.element_ty)
    row_ptr = logits_ptr + token * num_experts
    tl.store(row_ptr + offs_e, logits, mask=e_mask)
    # Every thread's stores happen before this program's ticket; the release of the atomic
    # publishes them to the program that draws the last ticket (its acquire).
    tl.debug_barrier()
    ticket = tl.atomic_add(counters_ptr + token, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) - 1:
        # Last program of this token: all E logits are stored. Volatile loads bypass L1 (not
        # coherent across SMs), so they read what the other programs stored.
        offs_all = tl.arange(0, BLOCK_ALL_E)
        row = tl.load(row_ptr + offs_all, mask=offs_all < num_experts, other=-float("inf"),
                      volatile=True)  # fmt: skip
        _route_token(row, token, topk_weights_ptr, topk_ids_ptr, num_experts,
                     TOP_K, RENORMALIZE, BLOCK_ALL_E, BLOCK_TOPK)  # fmt: skip
        # Back to zero for the next launch (next layer, next graph replay): every other program
        # of this token has already taken its ticket.
        tl.store(counters_ptr + token, 0)
