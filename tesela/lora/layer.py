"""The LoRA op a LoRA-enabled linear layer runs: its projection with the adapters' deltas.

`torch.ops.tesela.lora_linear(x, weight, bias, a, b, ...)` returns the base projection with every
token's adapter delta added: at prefill sizes, where a tuning run measured it faster, the LoRA
shrink and then one GEMM with the expand in its epilogue (tesela/lora/fused_gemm.py); else the base
GEMM, then the LoRA kernels adding the delta into its output. It is an ordinary (non-split) op: it
runs inside captured graph segments and compiled pieces. Its Python body runs at warmup, capture
and eager time only; there it checks that the forward context's plan has a LoRA part planned for
the very batch being run, whose buffers no later plan rewrote (the stale-state guard), and picks
the kernels planned for the batch. At a piecewise replay the attention split op makes the same
check (`ForwardPlan.check`); a FULL graph's runner checks its plan before `replay()`
(`ForwardPlanner.check_replay`). It never skips the kernels for a batch without adapters: such a
batch is all slot -1 tokens in the same launches, so a graph captured on it still adds the deltas
of a later batch that has them.
"""

from __future__ import annotations

import torch

from tesela.core.forward_context import get_forward_context
from tesela.lora.fused_gemm import FusedTiles, fused_tiles, lora_gemm
from tesela.lora.kernels import torch_lora, triton_lora
from tesela.lora.state import LoRABatchState, StaleLoRAStateError
from tesela.lora.tiles import SGMV


def _state() -> LoRABatchState:
    context = get_forward_context()
    plan = context.plan
    if plan.lora is None:
        raise StaleLoRAStateError(
            f"LoRA layers ran {context.batch.stamp} with a plan that has no LoRA part: plan "
            "batches with a planner that holds the LoRA manager"
        )
    context.check_plan("LoRA")  # planned for this batch, buffers still current
    return plan.lora


@torch.library.custom_op("tesela::lora_linear", mutates_args=())
def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    slice_offsets: torch.Tensor,
    host_offsets: list[int],
) -> torch.Tensor:
    state = _state()
    manager = state.manager
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    sizes = _slice_sizes(host_offsets)
    if manager.backend == "triton":
        tiles = _fused(x2, weight, a, sizes, state.style)
        if tiles is not None:  # the delta inside the base GEMM
            y = lora_gemm(x2, weight, bias, a, b, sizes, manager.buffers, tiles)
            return y.view(*x.shape[:-1], -1)
    y = manager.base_linear(x, weight, bias)
    y2 = y.view(-1, y.shape[-1])
    if manager.backend == "triton":
        triton_lora(x2, y2, a, b, slice_offsets, max(sizes), manager.buffers, state.style)
    else:
        torch_lora(
            x2, y2, a, b, tuple(host_offsets), state.segments,
            manager.slot_ranks, manager.slot_scalings,
        )  # fmt: skip
    return y


def _slice_sizes(offsets: list[int]) -> list[int]:
    return [hi - lo for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)]


def _fused(x2: torch.Tensor, weight, a, sizes: list[int], style: str) -> FusedTiles | None:
    """The fused GEMM's tiles where the layer runs it for this launch: the table's entry, and
    for decode batches only the one-launch kernel (the prefill-sized entries were tuned on
    extend segments)."""
    tiles = fused_tiles(x2, weight, a, sizes)
    return tiles if tiles is not None and (tiles.small or style == SGMV) else None


def launches_per_target(module: torch.nn.Module, num_tokens: int, style: str) -> int:
    """Kernel launches a LoRA-enabled linear adds to its base GEMM for a batch of this many
    tokens of this style (Triton LoRA): none where the one-launch fused GEMM runs, the shrink
    where the prefill-sized one does, else gather's one or sgmv's two."""
    x = module.weight.new_empty((num_tokens, module.weight.shape[1]))
    tiles = _fused(x, module.weight, module.lora_a, _slice_sizes(module.lora_offsets), style)
    if tiles is not None:
        return 0 if tiles.small else 1
    return 2 if style == SGMV else 1


@lora_linear.register_fake
def _(x, weight, bias, a, b, slice_offsets, host_offsets) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
