"""The per-batch LoRA state: persistent device buffers and the plan part that describes them.

`LoRABuffers` hold what the kernels (and so the captured graphs) read, at fixed addresses;
`LoRABatchState` is the LoRA part of one batch's `ForwardPlan` (tesela/core/plan.py), stamped
with the batch, and knows whether the buffers still hold that batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tesela.core.forward_batch import BatchStamp
from tesela.core.plan import StaleMetadataError

if TYPE_CHECKING:
    from tesela.lora.manager import LoRAManager

NO_SLOT = -1  # the base model: no adapter


class StaleLoRAStateError(StaleMetadataError):
    """LoRA layers ran with LoRA state planned for another batch (or none at all)."""


@dataclass
class LoRABuffers:
    """Per-batch LoRA state at fixed addresses, sized for the largest batch; graphs read it."""

    token_slot: torch.Tensor  # [max_tokens] int32: adapter slot of every token (-1: none)
    token_seg: torch.Tensor  # [max_tokens] int32: segment of every token
    seg_start: torch.Tensor  # [max_tokens + 2] int32: first token of every segment
    seg_slot: torch.Tensor  # [max_tokens + 1] int32: adapter slot of every segment
    ranks: torch.Tensor  # [max_loras] int32: rank of each slot's adapter (0: empty)
    scalings: torch.Tensor  # [max_loras] fp32

    @classmethod
    def allocate(cls, max_tokens: int, max_loras: int, device) -> LoRABuffers:
        def ints(n: int, value: int) -> torch.Tensor:
            return torch.full((n,), value, dtype=torch.int32, device=device)

        return cls(
            token_slot=ints(max_tokens, NO_SLOT),
            token_seg=ints(max_tokens, 0),
            seg_start=torch.tensor([0] + [max_tokens] * (max_tokens + 1), dtype=torch.int32).to(
                device
            ),
            seg_slot=ints(max_tokens + 1, NO_SLOT),
            ranks=ints(max_loras, 0),
            scalings=torch.zeros(max_loras, dtype=torch.float32, device=device),
        )

    @property
    def max_tokens(self) -> int:
        return int(self.token_slot.shape[0])

    def write(self, segments: list[tuple[int, int, int]], num_tokens: int) -> None:
        """Write a batch's segments (start, end, slot) covering its `num_tokens` tokens."""
        n, num_segs = num_tokens, len(segments)
        if n > self.max_tokens:
            raise AssertionError(f"{n} tokens exceed the LoRA buffers ({self.max_tokens})")
        token_slot, token_seg = [], []
        for index, (start, end, slot) in enumerate(segments):
            token_slot += [slot] * (end - start)
            token_seg += [index] * (end - start)
        # One trailing segment with no adapter covers any padding up to the largest size.
        starts = [s for s, _, _ in segments] + [n, self.max_tokens]
        slots = [s for _, _, s in segments] + [NO_SLOT]
        host = torch.tensor(token_slot + token_seg + starts + slots, dtype=torch.int32)
        host = host.pin_memory() if self.token_slot.is_cuda else host
        host = host.to(self.token_slot.device, non_blocking=True)
        parts = host.split([n, n, num_segs + 2, num_segs + 1])
        self.token_slot[:n].copy_(parts[0])
        self.token_slot[n:].fill_(NO_SLOT)
        self.token_seg[:n].copy_(parts[1])
        self.token_seg[n:].fill_(num_segs)
        self.seg_start[: num_segs + 2].copy_(parts[2])
        self.seg_slot[: num_segs + 1].copy_(parts[3])


@dataclass
class LoRABatchState:
    """The LoRA part of one batch's plan (host side; the device side is in LoRABuffers)."""

    stamp: BatchStamp
    style: str  # sgmv | gather: the kernel style the batch's graph runs
    segments: list[tuple[int, int, int]]  # (start, end, slot), covering the real tokens
    lora_ids: tuple[int, ...]  # per row
    manager: LoRAManager = field(repr=False)  # whose buffers hold the device side

    @property
    def has_adapters(self) -> bool:
        return any(slot != NO_SLOT for _, _, slot in self.segments)

    def check_current(self, where: str) -> None:
        """The persistent buffers still hold this batch's segments (a graph replay reads them;
        planning another batch since rewrote them)."""
        held = self.manager.buffer_stamp
        if held != self.stamp:
            raise StaleLoRAStateError(
                f"{where} ran {self.stamp} with LoRA buffers holding {held}: another batch was "
                "planned since; plan the batch right before running it"
            )
