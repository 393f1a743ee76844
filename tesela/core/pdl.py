"""Programmatic dependent launch (PDL) for tesela's Triton kernels.

Between two kernels on a stream the GPU normally drains the first grid, flushes its writes and
only then launches and ramps up the second: about 1.5 us per boundary even inside a CUDA graph,
and a batch-1 decode step has a dozen boundaries per layer. With PDL (Hopper and later) the
second kernel is launched early: its programs become resident and block in
`griddepcontrol.wait` until the first grid has completed and its writes are visible, so the
launch and ramp-up overlap the first kernel's tail. Stream capture records the dependency as a
programmatic edge, so CUDA graphs keep it.

The contract, kept by construction:

- A kernel that may be launched with PDL takes `PDL: tl.constexpr` as its last parameter and
  calls `grid_dependency_sync(PDL)` before its first store, and before every load but those of
  memory that no kernel of the step writes while it may run. It waits for the previous grid,
  then lets the next one launch (waiting first bounds the queue: releasing before the wait would
  let every later kernel launch and sit resident). So a kernel's programs start only once the
  kernel before it has passed its own wait, that is once every kernel two or more launches back
  has completed; what those kernels, or the host, wrote can be read before the wait. That is:
  - weights and constant tables (no kernel writes them): the GEMV loads its first weight tile
    before the wait, and at 1-2 tokens its tile may span all of K, so the whole weight slice
    streams in while the previous kernel runs; the rotary kernels load their cos/sin rows and
    the KV pools' address table;
  - the batch's rows (positions, KV slots, sequence lengths, decode entries, the LoRA slots
    and ranks): the host copies them in before the step's first kernel, or a FULL
    graph's planning kernel writes them as the graph's first op, before the embedding (a
    PyTorch op, which waits for it). The q/k norm + rotary kernel loads the token's position,
    cos/sin and KV slot this way, decode attention its rows' lengths and split counts.
  Every load of what the kernel before writes (the activations) comes after the wait.
- A launch sets the kernel's `PDL` and Triton's `launch_pdl` together, never apart: a kernel
  launched early whose body does not wait would read its inputs before they are written.
  `kernel[grid](...)` call sites pass `**launch_kwargs(device, num_tokens)`; `CachedLauncher`
  appends the `PDL` argument itself and compiles with the same flag.
- Kernels that are not Triton (cuBLAS, PyTorch ops, NCCL) launch as always and wait for the
  whole previous grid: mixing them in is always safe, they just gain nothing.

PDL is used for launches of at most MAX_TOKENS tokens: decode steps up to batch 64 and short
prefills, chains of short kernels where the boundaries are a large part of the step. Larger
steps launch as before: on an H100, 1024- and 4096-token prefills ran 8-12% slower with PDL (the
next kernel's programs held SM resources while they waited), where batch-1 decode ran 8-25%
faster with it. Raising the bound from 16 to 64 tokens (H200, qwen3-0.6b) made the batch-32
decode graph 2-14% faster and 32/64-token prefills 4% faster as whole graphs, 11% as FULL
mixed graphs (docs/bench-results.md).

On by default where the device supports it (compute capability 9.0 or later, a Triton that has
`launch_pdl`, not the interpreter); `TESELA_PDL=0` turns it off. `status(device)` says which
and why (`tesela doctor`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional on CPU: nothing launches then
    triton = None

MAX_TOKENS = 64  # launches over more tokens than this never use PDL (module docstring)
# The pointers a kernel may load from before its wait (tests/test_pdl.py reads the kernels for
# them; module docstring): weights, biases and constant tables, and the batch's rows written
# before the forward. A kernel names them so; anything else is loaded after the wait.
PRE_WAIT_POINTERS = (
    "w_ptr", "b_ptr", "q_w_ptr", "k_w_ptr", "cos_sin", "pool_pointers_ptr",  # weights, tables
    "pos_ptr", "slots_ptr", "seq_lens_ptr", "entry_rows_ptr", "entry_tokens_ptr",  # batch rows
    "ranks_ptr", "scalings_ptr", "token_slot_ptr", "real_ptr",  # the LoRA batch's rows
)  # fmt: skip

_forced: bool | None = None  # set only inside `forced(...)`


def _triton_has_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__


@functools.cache
def _device_status(index: int) -> tuple[bool, str]:
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        return False, "off: Triton kernels run under the interpreter"
    if os.environ.get("TESELA_PDL", "1") == "0":
        return False, "off: TESELA_PDL=0"
    if triton is None or not _triton_has_pdl():
        return False, "off: this Triton has no launch_pdl / griddepcontrol"
    capability = torch.cuda.get_device_capability(index)
    if capability < (9, 0):
        return False, f"off: compute capability {capability[0]}.{capability[1]} < 9.0"
    return True, f"on: compute capability {capability[0]}.{capability[1]}"


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _on(index: int) -> bool:
    """The device's support, unless a `forced(...)` scope turns it off."""
    return _device_status(index)[0] and _forced is not False


def status(device: torch.device) -> tuple[bool, str]:
    """Whether kernels launched on `device` use PDL, and why."""
    if device.type != "cuda":
        return False, f"off: {device.type} device"
    index = _index(device)
    if _on(index):
        return True, _device_status(index)[1]
    return False, "off: forced off" if _forced is False else _device_status(index)[1]


def enabled_on(index: int, num_tokens: int) -> bool:
    """Whether a launch over `num_tokens` tokens on CUDA device `index` uses PDL (the
    launchers' per-call check, kept cheap)."""
    return num_tokens <= MAX_TOKENS and _on(index)


def launch_kwargs(device: torch.device, num_tokens: int) -> dict:
    """The keywords of a `kernel[grid](...)` launch over `num_tokens` tokens on `device`: the
    kernel's PDL constexpr and Triton's launch_pdl, always equal."""
    use_pdl = device.type == "cuda" and enabled_on(_index(device), num_tokens)
    return _ON if use_pdl else _OFF


_ON, _OFF = {"PDL": True, "launch_pdl": True}, {"PDL": False}


@contextlib.contextmanager
def forced(value: bool) -> Iterator[None]:
    """PDL forced on (where supported) or off for launches in this scope: a runner built and
    captured inside it keeps that choice. Refuses nesting."""
    global _forced
    if _forced is not None:
        raise RuntimeError("pdl.forced(...) scopes do not nest")
    _forced = value
    try:
        yield
    finally:
        _forced = None


if triton is not None and _triton_has_pdl():
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def grid_dependency_sync(PDL: tl.constexpr):
        """A PDL kernel's first step: wait for the previous grid, then release the next."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

elif triton is not None:

    @triton.jit
    def grid_dependency_sync(PDL: tl.constexpr):
        tl.static_assert(not PDL, "this Triton has no griddepcontrol: PDL is never on")

else:
    grid_dependency_sync = None  # no Triton: no kernel calls it
