"""Whether the CPU graph stand-in is recording ATen ops right now (tesela/executor/graphs.py).

A breakable segment on CPU is recorded op by op and replayed by re-running the ops. A Triton
kernel launched from Python (the fused kernels under the interpreter) is no ATen op, so while a
recording runs, the fused layers call their `tesela::` custom ops instead, which the recorder
sees as one op each and replays (tesela/layers/fused.py, `opaque_under_trace`)."""

from __future__ import annotations

_recording = False


def recording_ops() -> bool:
    return _recording


def set_recording_ops(on: bool) -> None:
    global _recording
    _recording = on
