"""Graph objects and their factories: CUDA graphs on a GPU, a recording stand-in on CPU.

Runners never build `torch.cuda.CUDAGraph` themselves: they ask their `GraphFactory` for a
graph and drive it the same way on every device, so the CPU tests run the very code (planning,
warmup, capture of every size, replay) that the GPU runs; only the graph object differs.

A graph is captured either as a whole callable (`capture(fn)`, FULL decode graphs and compiled
pieces) or between `begin()` and `end()` (breakable segments, whose capture is interrupted by
split ops). After capture its outputs hold real data (a CUDA graph records without running, so
`end` replays it once), and `replay()` recomputes them in place, at the same addresses.

The CPU stand-in (`CpuGraph`) re-runs the recorded callable and copies its results into the
captured outputs, or re-runs the recorded ATen ops (breakable segments are plain PyTorch between
split ops; a Triton kernel launched from Python goes through its custom op while a recording
runs, tesela/core/recording.py) writing each result into the tensor captured for it. Either way later reads see
replay-time values at capture-time tensors, which is what makes stale static state visible.

Every factory remembers the graphs it made (weakly) and `reset_all()` destroys them whoever
still holds them: a tensor-parallel rank must free every graph that captured a collective
before it leaves the process group (NCCL's teardown waits for them), and a stray reference (a
closure, a report, dynamo's code cache) must not be able to keep one alive.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tesela.core.recording import set_recording_ops


def non_owning_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A view of `tensor`'s memory that does not keep that memory allocated."""
    storage = tensor.untyped_storage()
    alias_storage = torch._C._construct_storage_from_data_pointer(
        storage.data_ptr(), tensor.device, storage.nbytes()
    )
    alias = torch.empty((), dtype=tensor.dtype, device=tensor.device)
    return alias.set_(alias_storage, tensor.storage_offset(), tensor.shape, tensor.stride())


class CudaGraph(torch.cuda.CUDAGraph):
    """A CUDA graph bound to its factory's memory pool; `replay` is torch's own (no wrapper)."""

    def __new__(cls, pool: Any) -> CudaGraph:
        return super().__new__(cls)

    def __init__(self, pool: Any) -> None:
        super().__init__()
        self.pool = pool

    def begin(self) -> None:
        self.capture_begin(pool=self.pool)

    def end(self) -> None:
        self.capture_end()
        self.replay()  # capture records without running: make the outputs real

    def capture(self, fn: Callable[[], Any]) -> Any:
        self.begin()
        output = fn()
        self.end()
        return output


class _TracksGraphs:
    """What both factories share: the (weak) list of the graphs they made, for `reset_all`."""

    def __init__(self) -> None:
        self._made: weakref.WeakSet = weakref.WeakSet()

    def _track(self, graph):
        self._made.add(graph)
        return graph

    def reset_all(self) -> int:
        """Destroy every graph this factory made (module docstring); returns how many."""
        graphs = list(self._made)
        for graph in graphs:
            graph.reset()
        self._made.clear()
        return len(graphs)


class CudaGraphFactory(_TracksGraphs):
    """CUDA graphs sharing one memory pool, captured on a side stream with gc paused."""

    device_type = "cuda"

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def graph(self) -> CudaGraph:
        return self._track(CudaGraph(self.pool))

    alias = staticmethod(non_owning_alias)

    @contextlib.contextmanager
    def capturing(self) -> Iterator[list[int]]:
        """Capture scope; yields a one-item list that holds the graph memory it took (bytes)."""
        # Collect garbage, then empty the ordinary cache on both sides, so the difference is
        # the graph pool alone (collected first: garbage freed during capture, e.g. an earlier
        # runner's, would come back at the end and make the difference negative).
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        measured = [0]
        gc.disable()  # a collection per capture costs seconds over a ladder (vLLM #10059)
        try:
            with torch.cuda.stream(torch.cuda.Stream(self.device)):
                yield measured
            torch.cuda.synchronize(self.device)
        finally:
            gc.enable()
        torch.cuda.empty_cache()
        measured[0] = free_before - torch.cuda.mem_get_info(self.device)[0]


def _copy_into(captured: Any, fresh: Any) -> None:
    """Write `fresh` results into the tensors captured for them (static addresses)."""
    for dst, src in zip(tree_flatten(captured)[0], tree_flatten(fresh)[0], strict=True):
        if not isinstance(dst, torch.Tensor):
            continue
        # In-place ops and views return the captured memory itself: nothing to copy.
        same = dst.data_ptr() == src.data_ptr() and dst.stride() == src.stride()
        if not same and dst.numel():
            dst.copy_(src)


class _OpRecorder(TorchDispatchMode):
    """Runs and records every ATen op into the list of the segment being captured. A split op
    runs inside this handler, and its hook ends one segment and begins the next: then only the
    target list changes (the split op itself is not recorded) and the mode stays entered."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list | None = None
        self.entered = False
        self.depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = self.ops
        self.depth += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.depth -= 1
        if target is not None and target is self.ops:
            target.append((func, args, kwargs, out))
        return out


class CpuGraph:
    """The CPU stand-in for a CUDA graph (module docstring)."""

    def __init__(self, recorder: _OpRecorder) -> None:
        self._recorder = recorder
        self._ops: list = []
        self._fn: Callable[[], Any] | None = None
        self._output: Any = None
        self._reset = False

    def begin(self) -> None:
        recorder = self._recorder
        recorder.ops = self._ops
        set_recording_ops(True)  # Python-launched kernels go through their custom ops
        if not recorder.entered:
            recorder.__enter__()
            recorder.entered = True

    def end(self) -> None:
        recorder = self._recorder
        recorder.ops = None
        set_recording_ops(False)
        if recorder.depth == 0:  # not inside a split op's dispatch: leave the mode
            recorder.__exit__(None, None, None)
            recorder.entered = False

    def capture(self, fn: Callable[[], Any]) -> Any:
        self._output = fn()
        self._fn = fn
        return self._output

    def reset(self) -> None:
        """Forget the recording, as a reset CUDA graph does: replaying it is an error."""
        self._ops, self._fn, self._output = [], None, None
        self._reset = True

    def replay(self) -> None:
        if self._reset:
            raise RuntimeError("replay of a graph that was reset (its runner was released)")
        if self._fn is not None:
            _copy_into(self._output, self._fn())
            return
        for func, args, kwargs, out in self._ops:
            _copy_into(out, func(*args, **kwargs))


class CpuGraphFactory(_TracksGraphs):
    """CPU stand-ins; tensors stay owned (no pool whose memory could be reused)."""

    device_type = "cpu"

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self._recorder = _OpRecorder()

    def graph(self) -> CpuGraph:
        return self._track(CpuGraph(self._recorder))

    @staticmethod
    def alias(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @contextlib.contextmanager
    def capturing(self) -> Iterator[list[int]]:
        try:
            yield [0]
        finally:
            if self._recorder.entered:  # a capture that raised mid-segment
                self._recorder.ops = None
                self._recorder.__exit__(None, None, None)
                self._recorder.entered = False


GraphFactory = CudaGraphFactory | CpuGraphFactory


def graph_factory_for(device: torch.device) -> GraphFactory:
    return CudaGraphFactory(device) if device.type == "cuda" else CpuGraphFactory(device)
