"""Persistent scratch for kernels that coordinate their programs through memory.

A one-launch reduction across programs (tesela/executor/argmax.py's row maximum) keeps
per-output state between its programs: a ticket counter, a running key. The program that
finishes last resets what it used, so the scratch is the same after every launch as before it,
and a CUDA graph can replay the launch any number of times.

The buffer of a device only grows, and a buffer it outgrew is kept (never freed): a graph
captured earlier still reads it. Growing during a stream capture is refused, since the fill
would be recorded into the graph instead of run; the runners' warmup before each capture makes
the largest buffer first. Launches that share a scratch must not run concurrently (the engine
launches them on one stream).
"""

from __future__ import annotations

import torch

from tesela.core.device import device_key


class DeviceScratch:
    """A growing, never-freed buffer per device, every element `fill` between launches."""

    def __init__(self, name: str, dtype: torch.dtype, fill: int) -> None:
        self.name = name
        self.dtype = dtype
        self.fill = fill
        self.buffers: dict[torch.device, torch.Tensor] = {}
        self.retired: list[torch.Tensor] = []  # outgrown, kept for the graphs that read them

    def get(self, device: torch.device, numel: int) -> torch.Tensor:
        """At least `numel` elements on `device`."""
        device = device_key(device)
        current = self.buffers.get(device)
        if current is not None and current.numel() >= numel:
            return current
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"the {self.name} scratch must grow to {numel} elements during a CUDA graph "
                "capture: run the kernel once at the captured size before capturing (the "
                "runners' warmup does)"
            )
        size = max(numel, 2 * current.numel() if current is not None else 256)
        if current is not None:
            self.retired.append(current)
        self.buffers[device] = torch.full((size,), self.fill, dtype=self.dtype, device=device)
        return self.buffers[device]


# Per output tile of a split-K launch, how many of its splits have finished: the tile's last
# program to arrive adds the partial sums and puts its count back to 0. Shared by the split-K
# kernels (tesela/layers/gemv.py's split GEMV, tesela/lora/fused_gemm.py's one-launch LoRA GEMM).
SPLIT_K_ARRIVALS = DeviceScratch("split-K arrival", torch.int32, 0)
