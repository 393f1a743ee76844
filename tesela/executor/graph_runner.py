"""The runner interface every execution path implements, its capture report, and the eager
runner (the path every batch can take).

A runner is built from explicit collaborators (the model, a planner, static buffers, sizes, a
graph factory), never from the ModelRunner. The dispatcher (tesela/executor/dispatcher.py) asks
each runner in order whether it can serve a batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from tesela.core.forward_batch import ForwardBatch
from tesela.core.forward_context import forward_context
from tesela.executor.planner import ForwardPlanner


@dataclass
class CaptureReport:
    mode: str
    sizes: tuple[int, ...]
    seconds: float = 0.0
    graph_memory_bytes: int = 0
    segments_per_size: int = 0
    cuda_graphs: bool = False
    verify_max_abs_diff: dict[int, float] = field(default_factory=dict)

    @property
    def graph_memory_gib(self) -> float:
        return self.graph_memory_bytes / 2**30

    def summary(self) -> str:
        kind = "CUDA graphs" if self.cuda_graphs else "CPU stand-in graphs"
        sizes = f"({self.sizes[0]}..{self.sizes[-1]})" if self.sizes else "(none)"
        return (
            f"{self.mode}: {len(self.sizes)} sizes {sizes}, {self.segments_per_size} "
            f"pieces each, {kind}, built in {self.seconds:.2f} s, graph memory "
            f"{self.graph_memory_gib:.3f} GiB"
        )


class GraphRunner(ABC):
    """One way to run a batch: `can_run` says why not (None: it can), `capture` builds what it
    needs once, `run` returns the hidden states of the batch's real tokens."""

    name: str
    # Whether `run` writes a batch's fed token ids itself (overlap scheduling); for runners
    # that do not, the dispatcher writes them into input_ids before (`ForwardBatch.feed_tokens`).
    resolves_feed: bool = False

    @abstractmethod
    def can_run(self, batch: ForwardBatch) -> str | None: ...

    @abstractmethod
    def capture(self) -> CaptureReport | None: ...

    @abstractmethod
    def run(self, batch: ForwardBatch) -> torch.Tensor: ...

    @abstractmethod
    def report(self) -> CaptureReport | None: ...


class EagerRunner(GraphRunner):
    """The model as written, planned for the batch: the reference every graph path equals."""

    name = "eager"

    def __init__(self, model: torch.nn.Module, planner: ForwardPlanner) -> None:
        self.model = model
        self.planner = planner

    def can_run(self, batch: ForwardBatch) -> str | None:
        return None

    def capture(self) -> None:
        return None

    def report(self) -> None:
        return None

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        plan = self.planner.plan(batch)
        with forward_context(batch, plan, self.planner.attn_backend):
            return self.model(batch.input_ids, batch.positions)
