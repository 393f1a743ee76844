"""The LoRA op that a LoRA-enabled linear layer runs after its base GEMM.

`torch.ops.tesela.lora_linear(x, y, a, b, ...)` adds every token's adapter delta into `y` in
place. It is an ordinary (non-split) op: it runs inside captured graph segments and compiled
pieces. Its Python body runs at warmup, capture and eager time only; there it checks that the
forward context carries LoRA state planned for the very batch being run (the stale-state
guard) and picks the kernel style planned for the batch. It never skips the kernels for a
batch without adapters: such a batch is all slot -1 tokens in the same launches, so a graph
captured on it still adds the deltas of a later batch that has them.
"""

from __future__ import annotations

import torch

from tesela.executor.forward_context import get_forward_context
from tesela.lora.kernels import torch_lora, triton_lora


def _state():
    from tesela.lora.manager import StaleLoRAStateError

    context = get_forward_context()
    state = context.lora
    if state is None:
        raise StaleLoRAStateError(
            f"LoRA layers ran {context.batch.stamp} with no LoRA state planned: plan the batch "
            "(LoRAManager.plan) and pass it to the forward context"
        )
    return state.manager.state_for(context.batch, state)


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
