"""Top-k expert selection: router logits -> (topk_weights, topk_ids) per token.

Each architecture has its own rule (see `MoeConfig.scoring`), reproduced here with the same
dtypes as transformers so greedy outputs match: Qwen3-MoE rounds the weights back to the
activation dtype, Mixtral keeps them in fp32.

`select_experts` is the rule in torch ops (softmax, topk, sum, div, cast: five launches);
`tesela::moe_topk` is the same rule in one Triton launch (`router_topk_kernel`, one program per
token), which the MoE layer uses wherever the experts run as Triton.

Ties: the kernel gives equal probabilities to the lowest expert index first (a fixed rule);
torch.topk promises no order. fp32 logits almost never tie; bf16
logits tie often. A tie inside the top k only swaps two slots (the same experts, the same sum);
a tie at the k-th place picks the lower index, as torch.topk's CUDA selection does in practice
(its CPU path and the order it sorts tied outputs in may differ).

The router GEMM before the kernel stays the tuned `gemv.linear`: folded in, one program per
token would stream the whole [E, H] gate weight alone (512 KB for qwen3-30b-a3b, several
microseconds on one SM at batch 1), while the GEMV spreads it over the GPU; splitting E over
programs would need a second pass for the top-k, which is the launch saved.
"""

from __future__ import annotations

import torch

SCORINGS = ("softmax_topk", "topk_softmax")
# One program holds a token's E probabilities in registers: up to here one block fits well.
MAX_FUSED_EXPERTS = 1024


def select_experts(
    router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns weights [M, top_k] and expert ids [M, top_k] (int64), best expert first."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if scoring == "topk_softmax":
        # softmax over the k best logits == the top-k of the full softmax, renormalised.
        return weights / weights.sum(dim=-1, keepdim=True), ids
    if scoring != "softmax_topk":
        raise ValueError(f"unknown MoE router scoring {scoring!r}")
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def _weights_dtype(router_logits: torch.Tensor, scoring: str) -> torch.dtype:
    return torch.float32 if scoring == "topk_softmax" else router_logits.dtype


@torch.library.custom_op("tesela::moe_topk", mutates_args=())
def fused_select_experts(
    router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`select_experts` in one Triton launch (same contract, same output dtypes)."""
    import triton

    from tesela.layers.moe import kernels

    if scoring not in SCORINGS:
        raise ValueError(f"unknown MoE router scoring {scoring!r}: expected one of {SCORINGS}")
    num_tokens, num_experts = router_logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and the {num_experts} experts")
    router_logits = router_logits.contiguous()
    weights = router_logits.new_empty(
        num_tokens, top_k, dtype=_weights_dtype(router_logits, scoring)
    )
    ids = router_logits.new_empty(num_tokens, top_k, dtype=torch.int64)
    if num_tokens == 0:
        return weights, ids
    block_e = triton.next_power_of_2(num_experts)
    kernels.router_topk_kernel[(num_tokens,)](
        router_logits, weights, ids, num_experts, router_logits.stride(0),
        TOP_K=top_k, RENORMALIZE=renormalize or scoring == "topk_softmax",
        BLOCK_E=block_e, BLOCK_TOPK=triton.next_power_of_2(top_k),
        # Up to 256 experts one warp holds the row: the 2k reductions stay in shuffles.
        num_warps=1 if block_e <= 256 else 4,
    )  # fmt: skip
    return weights, ids


@fused_select_experts.register_fake
def _(router_logits, top_k, scoring, renormalize):
    shape = (router_logits.shape[0], top_k)
    return (
        router_logits.new_empty(shape, dtype=_weights_dtype(router_logits, scoring)),
        router_logits.new_empty(shape, dtype=torch.int64),
    )
