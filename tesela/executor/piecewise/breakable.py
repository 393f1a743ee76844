"""The `breakable` capture strategy: no torch.compile, the ordinary forward under capture.

While a size is captured, every split op ends the current CUDA graph segment, runs eagerly
(outside the capture) and is recorded; then a new segment begins. Replay runs the segment
graphs with the recorded split calls between them; each call reads the forward context at
replay time, so attention runs with the metadata planned for the replayed batch.

Every segment of every size is captured into one shared memory pool. A recorded split call
keeps its tensors as non-owning aliases, so their memory follows the lifetimes the model code
gave it during capture: it is reused by later segments of the same size (after the split call's
last use, in stream order) and by the next, smaller size. Replay runs the same work in the same
order on one stream, so every tensor is rewritten before it is read; only one size replays at
a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def non_owning_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A view of `tensor`'s memory that does not keep that memory allocated."""
    storage = tensor.untyped_storage()
    alias_storage = torch._C._construct_storage_from_data_pointer(
        storage.data_ptr(), tensor.device, storage.nbytes()
    )
    alias = torch.empty((), dtype=tensor.dtype, device=tensor.device)
    return alias.set_(alias_storage, tensor.storage_offset(), tensor.shape, tensor.stride())


@dataclass
class SplitCall:
    fn: Callable[..., None]
    tensors: tuple[torch.Tensor, ...]
    args: tuple

    def __call__(self) -> None:
        self.fn(*self.tensors, *self.args)

    def release(self) -> None:
        self.tensors = tuple(non_owning_alias(t) for t in self.tensors)


@dataclass
class BreakableGraph:
    """One captured size: graph segments with the split calls that run between them."""

    num_tokens: int
    segments: list[torch.cuda.CUDAGraph] = field(default_factory=list)
    splits: list[SplitCall] = field(default_factory=list)
    output: torch.Tensor | None = None

    def replay(self) -> torch.Tensor:
        for i, segment in enumerate(self.segments):
            segment.replay()
            if i < len(self.splits):
                self.splits[i]()
        return self.output


class SegmentRecorder:
    """The split hook used while one size is captured."""

    def __init__(self, graph: BreakableGraph, pool) -> None:
        self.graph = graph
        self.pool = pool
        self._current: torch.cuda.CUDAGraph | None = None

    def begin(self) -> None:
        self._current = torch.cuda.CUDAGraph()
        self._current.capture_begin(pool=self.pool)

    def end(self) -> None:
        self._current.capture_end()
        self.graph.segments.append(self._current)
        # Run what was just captured so the eager split call sees real data (its metadata
        # check and its kernels run for real during capture, exactly as during replay).
        self._current.replay()
        self._current = None

    def __call__(self, fn: Callable[..., None], tensors: tuple[torch.Tensor, ...], *args) -> None:
        self.end()
        call = SplitCall(fn, tensors, args)
        call()
        call.release()
        self.graph.splits.append(call)
        self.begin()

    def finish(self, output: torch.Tensor) -> None:
        self.end()
        self.graph.output = non_owning_alias(output)
