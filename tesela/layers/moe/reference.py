"""The experts in plain PyTorch: a loop over experts, each on the tokens routed to it.

The CPU path and the oracle the Triton kernels are tested against. It indexes with
data-dependent shapes (`nonzero`), so it never runs inside a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_reference(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """hidden [M, H], w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I], topk [M, k].

    Pairs whose expert id is outside 0..E-1 (padding tokens) contribute nothing."""
    num_experts, intermediate = w13.shape[0], w2.shape[2]
    out = torch.zeros_like(hidden_states)
    for expert in range(num_experts):
        rows, slots = (topk_ids == expert).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        gate, up = F.linear(hidden_states[rows], w13[expert]).split(intermediate, dim=-1)
        expert_out = F.linear(F.silu(gate) * up, w2[expert])
        weighted = expert_out * topk_weights[rows, slots, None]
        out.index_add_(0, rows, weighted.to(out.dtype))
    return out
