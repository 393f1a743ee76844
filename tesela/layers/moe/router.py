"""Top-k expert selection: router logits -> (topk_weights, topk_ids) per token.

Each architecture has its own rule (see `MoeConfig.scoring`), reproduced here with the same
dtypes as transformers so greedy outputs match: Qwen3-MoE rounds the weights back to the
activation dtype, Mixtral keeps them in fp32.
"""

from __future__ import annotations

import torch


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
