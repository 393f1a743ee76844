"""Pinned host staging for small per-step host-to-device copies.

A graph replay rewrites persistent device buffers from host values every step. Pinning a fresh
host tensor per step (`pin_memory()`) costs host time, and reusing one pinned buffer would race
with a copy still queued behind the GPU's work (overlap scheduling builds step N+1 while step N
runs). `HostStaging` keeps a ring of pinned buffers, each reused only once the copy that last
read it has run (an event per buffer; by then it always has, two steps later).
"""

from __future__ import annotations

import numpy as np
import torch


class HostStaging:
    """Pinned host buffers of `numel` elements staging copies into one device buffer."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device, depth: int = 2):
        cuda = torch.device(device).type == "cuda"
        self._host = [torch.empty(numel, dtype=dtype, pin_memory=cuda) for _ in range(depth)]
        self._copied = [torch.cuda.Event() if cuda else None for _ in range(depth)]
        self._next = 0

    def acquire(self) -> np.ndarray:
        """The next buffer (a numpy view) to fill, once its previous copy has run."""
        event = self._copied[self._next]
        if event is not None:
            event.synchronize()
        return self._host[self._next].numpy()

    def send(self, dst: torch.Tensor, numel: int) -> None:
        """Copy the first `numel` values of the acquired buffer to `dst` (no host wait)."""
        index = self._next
        dst[:numel].copy_(self._host[index][:numel], non_blocking=True)
        if self._copied[index] is not None:
            self._copied[index].record()
        self._next = (index + 1) % len(self._host)
