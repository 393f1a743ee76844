"""The `breakable` piecewise mode: no torch.compile, the ordinary forward under capture.

While a size is captured, every split op ends the current graph segment, runs eagerly (outside
the capture) and is recorded; then a new segment begins. Replay runs the segment graphs with
the recorded split calls between them, bound at capture: a split function listed in
`SPLIT_BINDINGS` (tesela/attention/op.py; attention) is turned by its `bind` into the backend's
callable over the captured tensors, and each replay runs its `prepare` once (the plan check
against the replayed batch, the launch values every layer shares) and hands the result to every
bound call. So attention runs with the plan made for the replayed batch, checked once per replay
(after the first segment is launched, before any split call), and a split call costs its kernel
launches: no op dispatch, context lookup or slicing. A split function without a binding runs as
recorded, reading the forward context itself.

Every segment of every size is captured into one shared memory pool. A recorded split call
keeps its tensors as non-owning aliases (on CUDA), so their memory follows the lifetimes the
model code gave it during capture: it is reused by later segments of the same size (after the
split call's last use, in stream order) and by the next, smaller size. Replay runs the same
work in the same order on one stream, so every tensor is rewritten before it is read; only one
size replays at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tesela.attention.op import SPLIT_BINDINGS
from tesela.core.forward_batch import ForwardBatch
from tesela.core.forward_context import ForwardContext, forward_context, get_forward_context
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


def _unbound(call: SplitCall) -> Callable[[Any], None]:
    return lambda _prepared: call()


@dataclass
class BreakableGraph:
    """One captured size: graph segments with the split calls that run between them."""

    num_tokens: int
    segments: list[Any] = field(default_factory=list)
    splits: list[SplitCall] = field(default_factory=list)
    output: torch.Tensor | None = None
    # Sealed for replay: the first segment, then (bound split call, next segment) pairs, and
    # the `prepare` of the bound calls (run once per replay, after the first segment's launch,
    # so its host work overlaps that segment's GPU work).
    first: Callable[[], Any] | None = None
    steps: tuple[tuple[Callable[[Any], None], Callable[[], Any]], ...] = ()
    prepare: Callable[[ForwardContext], Any] | None = None

    def seal(self, backend: Any) -> None:
        bound, prepares = [], set()
        for call in self.splits:
            binding = SPLIT_BINDINGS.get(call.fn)
            if binding is None:
                bound.append(_unbound(call))
                continue
            prepare, bind = binding
            prepares.add(prepare)
            bound.append(bind(backend, call.tensors, *call.args))
        assert len(prepares) <= 1, "one prepared state per replay: one bound split function"
        self.prepare = prepares.pop() if prepares else None
        self.first = self.segments[0].replay
        self.steps = tuple(zip(bound, (s.replay for s in self.segments[1:]), strict=True))

    def _prepared(self, context: ForwardContext | None) -> Any:
        if self.prepare is None:
            return None
        return self.prepare(context if context is not None else get_forward_context())

    def replay(self, context: ForwardContext | None = None) -> torch.Tensor:
        """Run the captured size in the replay's forward context (default: the current one)."""
        self.first()
        prepared = self._prepared(context)
        for split, segment in self.steps:
            split(prepared)
            segment()
        return self.output

    def replay_timed(self, context: ForwardContext) -> tuple[torch.Tensor, float]:
        """`replay`, also returning the host seconds spent in the split calls alone (the
        per-replay `prepare` included): what `tesela bench prefill` reports per split."""
        clock = time.perf_counter
        self.first()
        start = clock()
        prepared = self._prepared(context)
        spent = clock() - start
        for split, segment in self.steps:
            start = clock()
            split(prepared)
            spent += clock() - start
            segment()
        return self.output, spent


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

    def finish(self, output: torch.Tensor, backend: Any) -> None:
        self.end()
        self.graph.output = self.graphs.alias(output)
        self.graph.seal(backend)


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
        recorder.finish(output, self.planner.attn_backend)
        self.captured[size] = graph
        self._report.segments_per_size = len(graph.segments)

    def split_signature(self) -> tuple:
        return tuple(
            (size, tuple((call.fn.__qualname__, call.args) for call in graph.splits))
            for size, graph in sorted(self.captured.items())
        )

    @torch.inference_mode()
    def split_host_seconds(self, batch: ForwardBatch) -> float:
        """Replay `batch` as `run` does and return the host seconds per split call (no sync:
        the host side alone, with the GPU work queued behind it)."""
        size = self.padded_size(batch.num_tokens)
        self.buffers.copy_from(batch, size)
        plan = self.planner.plan(batch)
        graph = self.captured[size]
        with forward_context(batch, plan, self.planner.attn_backend) as context:
            _, spent = graph.replay_timed(context)
        return spent / max(len(graph.splits), 1)

    def _replay(self, batch: ForwardBatch, plan: ForwardPlan, size: int) -> torch.Tensor:
        with forward_context(batch, plan, self.planner.attn_backend) as context:
            return self.captured[size].replay(context)
