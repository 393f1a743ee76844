"""The per-batch LoRA state: persistent device buffers and the plan part that describes them.

`LoRABuffers` hold what the kernels (and so the captured graphs) read, at fixed addresses;
`LoRABatchState` is the LoRA part of one batch's `ForwardPlan` (tesela/core/plan.py), stamped
with the batch, and knows whether the buffers still hold that batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
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
    """Per-batch LoRA state at fixed addresses, sized for the largest batch; graphs read it.

    Tokens at or past `real_tokens` (the padding of a captured size) are base-model tokens: the
    kernels clamp to that count, so a batch writes only its own tokens' entries, all of them
    (and the count) in one copy from the host, and none when the rows already hold its segments
    (the decode steps of one set of requests)."""

    meta: torch.Tensor  # [5, max_tokens + 1] int32: the rows below, one copy writes them all
    token_slot: torch.Tensor  # [max_tokens] int32: adapter slot of every token (-1: none)
    token_seg: torch.Tensor  # [max_tokens] int32: segment of every token
    seg_start: torch.Tensor  # [max_tokens + 1] int32: first token of every segment, then n
    seg_slot: torch.Tensor  # [max_tokens] int32: adapter slot of every segment
    real_tokens: torch.Tensor  # [1] int32: the batch's tokens; the rest is padding
    ranks: torch.Tensor  # [max_loras] int32: rank of each slot's adapter (0: empty)
    scalings: torch.Tensor  # [max_loras] fp32
    held: tuple | None = field(default=None, repr=False)  # (segments, n) the rows hold now

    @classmethod
    def allocate(cls, max_tokens: int, max_loras: int, device) -> LoRABuffers:
        meta = torch.zeros(5, max_tokens + 1, dtype=torch.int32, device=device)
        return cls(
            meta=meta,
            token_slot=meta[0, :max_tokens],
            token_seg=meta[1, :max_tokens],
            seg_start=meta[2],
            seg_slot=meta[3, :max_tokens],
            real_tokens=meta[4, :1],
            ranks=torch.zeros(max_loras, dtype=torch.int32, device=device),
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
        held = (tuple(segments), n)
        if held == self.held:  # decode steps of the same rows: the rows hold this batch already
            return
        self.held = held
        width = max(n, num_segs) + 1
        pinned = self.meta.is_cuda
        host = torch.zeros(5, width, dtype=torch.int32, pin_memory=pinned)
        rows = host.numpy()
        starts, ends, slots = np.array(segments, dtype=np.int32).reshape(num_segs, 3).T
        lengths = ends - starts
        rows[0, :n] = np.repeat(slots, lengths)
        rows[1, :n] = np.repeat(np.arange(num_segs, dtype=np.int32), lengths)
        rows[2, :num_segs], rows[2, num_segs] = starts, n
        rows[3, :num_segs] = slots
        rows[4, 0] = n
        self.meta[:, :width].copy_(host, non_blocking=pinned)

    def slots_of(self, num_tokens: int) -> torch.Tensor:
        """Every token's slot as the kernels see it (-1 past `real_tokens`), on the host."""
        real = int(self.real_tokens.item())
        slots = self.token_slot[:num_tokens].cpu().clone()
        slots[real:] = NO_SLOT
        return slots


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
