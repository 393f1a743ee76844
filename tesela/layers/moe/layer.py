"""`SparseMoeBlock`: the MLP of a mixture-of-experts decoder layer (router + fused experts).

Expert weights live in two stacked parameters, `experts.gate_up_proj` [E, 2I, H] (each
expert's gate rows, then its up rows) and `experts.down_proj` [E, H, I], the layout of
transformers 5's fused checkpoints; per-expert checkpoint tensors are copied into their slice
by `FusedExperts.load_shard`, one at a time.

On CUDA the router runs as Triton (at decode its GEMM and top-k in one launch,
`tesela::moe_router`, router.py) and the experts as the Triton fused MoE (at decode: router,
gate/up, down-with-sum = 3 launches per block, fused_moe.py); elsewhere as torch ops and the
torch reference loop.
`use_triton_on_cpu()` switches CPU runs to the Triton kernels (under TRITON_INTERPRET=1) so
tests drive the kernel path through a whole model.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

from tesela.config import MoeConfig
from tesela.layers.linear import Linear
from tesela.layers.moe import fused_moe as _fused_moe  # noqa: F401  (registers the op)
from tesela.layers.moe import padding
from tesela.layers.moe.router import (
    MAX_FUSED_EXPERTS,
    fused_router,
    fused_select_experts,
    select_experts,
)

_TRITON_ON_CPU = False


@contextlib.contextmanager
def use_triton_on_cpu() -> Iterator[None]:
    global _TRITON_ON_CPU
    previous, _TRITON_ON_CPU = _TRITON_ON_CPU, True
    try:
        yield
    finally:
        _TRITON_ON_CPU = previous


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    return (x.is_cuda or _TRITON_ON_CPU) and _triton_available()


class FusedExperts(nn.Module):
    """E experts' gate/up and down weights, stacked."""

    SHARD_KINDS = ("gate", "up", "down")

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size)
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int, str]) -> None:
        expert, kind = shard
        if not 0 <= expert < self.num_experts:
            raise ValueError(
                f"checkpoint has expert {expert}, but config.json says num_experts="
                f"{self.num_experts}"
            )
        i = self.intermediate_size
        target = {
            "gate": self.gate_up_proj.data[expert, :i],
            "up": self.gate_up_proj.data[expert, i:],
            "down": self.down_proj.data[expert],
        }[kind]
        if tuple(loaded.shape) != tuple(target.shape):
            raise ValueError(
                f"checkpoint tensor for expert {expert} {kind}_proj has shape "
                f"{tuple(loaded.shape)}, the model expects {tuple(target.shape)}: does "
                "config.json (moe_intermediate_size / intermediate_size) match the weights?"
            )
        target.copy_(loaded)

    def checkpoint_shards(self, param_name: str) -> list[tuple[int, str]]:
        """The per-expert shards that make up `param_name` (for the loader's completeness check)."""
        kinds = ("gate", "up") if param_name == "gate_up_proj" else ("down",)
        return [(e, kind) for e in range(self.num_experts) for kind in kinds]


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden_size: int, moe: MoeConfig) -> None:
        super().__init__()
        self.moe = moe
        self.gate = Linear(hidden_size, moe.num_experts)
        self.experts = FusedExperts(moe.num_experts, hidden_size, moe.intermediate_size)

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_weights, topk_ids) of each token."""
        rule = (self.moe.top_k, self.moe.scoring, self.moe.norm_topk_prob)
        triton_router = use_triton(hidden_states) and self.moe.num_experts <= MAX_FUSED_EXPERTS
        plain_gate = self.gate.bias is None and self.gate.lora_offsets is None
        if triton_router and plain_gate:
            # Router GEMM + top-k in one launch for decode batches; the op itself falls back to
            # the GEMM and `moe_topk` for larger ones (router.py).
            return fused_router(hidden_states, self.gate.weight, *rule)
        router_logits = self.gate(hidden_states)
        args = (router_logits, *rule)
        if triton_router:
            # One launch instead of softmax, topk, sum, div and cast (router.py).
            return fused_select_experts(*args)
        return select_experts(*args)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.route(hidden_states)
        return torch.ops.tesela.fused_moe(
            hidden_states,
            self.experts.gate_up_proj,
            self.experts.down_proj,
            topk_weights,
            topk_ids,
            padding.num_valid_tokens(hidden_states.device),
            use_triton(hidden_states),
        )
