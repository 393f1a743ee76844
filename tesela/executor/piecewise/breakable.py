"""The `breakable` piecewise mode: no torch.compile, the ordinary forward under capture.

While a size is captured, every split op ends the current graph segment, runs eagerly (outside
the capture) and is recorded; then a new segment begins. Replay runs the segment graphs with
the recorded split calls between them; each call reads the forward context at replay time, so
attention runs with the plan made for the replayed batch.

Every segment of every size is captured into one shared memory pool. A recorded split call
keeps its tensors as non-owning aliases (on CUDA), so their memory follows the lifetimes the
model code gave it during capture: it is reused by later segments of the same size (after the
split call's last use, in stream order) and by the next, smaller size. Replay runs the same
work in the same order on one stream, so every tensor is rewritten before it is read; only one
size replays at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tesela.core.forward_batch import ForwardBatch
from tesela.core.forward_context import forward_context
from tesela.core.plan import ForwardPlan
from tesela.executor.graphs import GraphFactory
from tesela.executor.piecewise.runner import PiecewiseRunner


@dataclass
class SplitCall:
    fn: Callable[..., None]
    tensors: tuple[torch.Tensor, ...]
    args: tuple

    def __call__(self) -> None:
        self.fn(*self.tensors, *self.args)


@dataclass
class BreakableGraph:
    """One captured size: graph segments with the split calls that run between them."""

    num_tokens: int
    segments: list[Any] = field(default_factory=list)
    splits: list[SplitCall] = field(default_factory=list)
    output: torch.Tensor | None = None
    # segment replays and split calls interleaved: the replay loop is one call per step
    steps: tuple[Callable[[], Any], ...] = ()

    def seal(self) -> None:
        steps: list[Callable[[], Any]] = []
        for i, segment in enumerate(self.segments):
            steps.append(segment.replay)
            if i < len(self.splits):
                steps.append(self.splits[i])
        self.steps = tuple(steps)

    def replay(self) -> torch.Tensor:
        for step in self.steps:
            step()
        return self.output


class SegmentRecorder:
    """The split hook used while one size is captured."""

    def __init__(self, graph: BreakableGraph, graphs: GraphFactory) -> None:
        self.graph = graph
        self.graphs = graphs
        self._current = None

    def begin(self) -> None:
        self._current = self.graphs.graph()
        self._current.begin()

    def end(self) -> None:
        # `end` makes the segment's outputs real, so the eager split call sees real data.
        self._current.end()
        self.graph.segments.append(self._current)
        self._current = None

    def __call__(self, fn: Callable[..., None], tensors: tuple[torch.Tensor, ...], *args) -> None:
        self.end()
        call = SplitCall(fn, tensors, args)
        call()
        call.tensors = tuple(self.graphs.alias(t) for t in tensors)
        self.graph.splits.append(call)
        self.begin()

    def finish(self, output: torch.Tensor) -> None:
        self.end()
        self.graph.output = self.graphs.alias(output)
        self.graph.seal()


class BreakablePiecewiseRunner(PiecewiseRunner):
    mode = "breakable"

    def __init__(self, **collaborators) -> None:
        super().__init__(**collaborators)
        self.model_fn = self.model
        self.captured: dict[int, BreakableGraph] = {}

    def _capture_size(self, batch: ForwardBatch, plan: ForwardPlan, size: int) -> None:
        graph = BreakableGraph(size)
        recorder = SegmentRecorder(graph, self.graphs)
        recorder.begin()
        output = self._forward(batch, plan, size, split_hook=recorder)
        recorder.finish(output)
        self.captured[size] = graph
        self._report.segments_per_size = len(graph.segments)

    def split_signature(self) -> tuple:
        return tuple(
            (size, tuple((call.fn.__qualname__, call.args) for call in graph.splits))
            for size, graph in sorted(self.captured.items())
        )

    def _replay(self, batch: ForwardBatch, plan: ForwardPlan, size: int) -> torch.Tensor:
        with forward_context(batch, plan, self.planner.attn_backend):
            return self.captured[size].replay()
