"""The LoRA op that a LoRA-enabled linear layer runs after its base GEMM.

`torch.ops.tesela.lora_linear(x, y, a, b, ...)` adds every token's adapter delta into `y` in
place. It is an ordinary (non-split) op: it runs inside captured graph segments and compiled
pieces. Its Python body runs at warmup, capture and eager time only; there it checks that the
forward context's plan has a LoRA part planned for the very batch being run, whose buffers no
later plan rewrote (the stale-state guard), and picks the kernel style planned for the batch.
At a piecewise replay the attention split op makes the same check (`ForwardPlan.check`); a FULL graph's runner checks its plan before `replay()` (`ForwardPlanner.check_replay`). It never skips the kernels for a
batch without adapters: such a batch is all slot -1 tokens in the same launches, so a graph
captured on it still adds the deltas of a later batch that has them.
"""

from __future__ import annotations

import torch

from tesela.core.forward_context import get_forward_context
from tesela.lora.kernels import torch_lora, triton_lora
from tesela.lora.state import LoRABatchState, StaleLoRAStateError


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


@torch.library.custom_op("tesela::lora_linear", mutates_args=("y",))
def lora_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    slice_offsets: torch.Tensor,
    host_offsets: list[int],
) -> None:
    state = _state()
    manager = state.manager
    y2 = y.view(-1, y.shape[-1])
    x2 = x.reshape(y2.shape[0], -1)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if manager.backend == "triton":
        max_size = max(hi - lo for lo, hi in zip(host_offsets[:-1], host_offsets[1:], strict=True))
        triton_lora(x2, y2, a, b, slice_offsets, max_size, manager.buffers, state.style)
    else:
        torch_lora(
            x2, y2, a, b, tuple(host_offsets), state.segments,
            manager.slot_ranks, manager.slot_scalings,
        )  # fmt: skip


@lora_linear.register_fake
def _(x, y, a, b, slice_offsets, host_offsets) -> None:
    return None
