"""Cached Triton launchers: relaunch a compiled kernel without `JITFunction.run`'s binding.

`kernel[grid](*args)` binds ~25 arguments, specializes each one and looks the compiled kernel
up on every call: 10-30 us of host time, several times per attention call. A `CachedLauncher`
does that once per *specialization key* and afterwards hands the arguments straight to the
compiled kernel's launcher (`CompiledKernel.run`, what `JITFunction.run` itself calls last).

The key is built cheaply by the caller, in parts computed when their values are fixed: a
kernel's parameters are laid out as consecutive groups (`Args`), e.g. the layer's tensors
(bound once per captured size), the KV pool's, the batch's (once per replay) and constants.
Each group carries a key over everything Triton specializes on in its values:

- a runtime group (`runtime_args`): per tensor its dtype and whether its address is 16-byte
  aligned; per int whether it equals 1, is divisible by 16 and fits int32; floats and bools
  by type. (Triton 3.x specializes exactly on these, or on fewer with `do_not_specialize`:
  the key is a superset, so two keys may share one compiled kernel but one key never needs two.)
- a constexpr group (`constexpr_args`): the values themselves.

The first launch of a key checks that every group's kind matches the kernel's parameters (a
constexpr passed in a runtime group would let two compile-time values share one key), launches
through `kernel[grid]` (compiling if needed) and keeps the compiled kernel; later launches of
the key call it directly. Under the Triton interpreter, or when the compiled kernel does not look
as expected (a Triton version whose internals differ), the launcher falls back to `kernel[grid]`
for good and records why (`fallback_reasons`, shown by `tesela doctor`). With
TESELA_CHECK_LAUNCHERS=1 every cached launch also asks Triton which compiled kernel its own
path would pick and raises if it differs, or if a tensor of a group moved since the group was
made (a debugging aid: it costs a full binding). While Triton launch hooks are installed (a
profiler such as proton), no handle is cached; handles cached before the hooks were installed
skip them.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Hashable
from typing import Any, NamedTuple

import torch

from tesela.core import pdl

logger = logging.getLogger("tesela.launcher")

CHECK_LAUNCHERS = os.environ.get("TESELA_CHECK_LAUNCHERS", "") == "1"

# kernel name -> why its launches take the plain `kernel[grid]` path (for `tesela doctor`)
fallback_reasons: dict[str, str] = {}

_INT32 = range(-(2**31), 2**31)
_interned: dict[Hashable, int] = {}


def _intern(key: Hashable) -> int:
    """A small int per distinct key: launch keys are then tuples of ints, cheap to hash."""
    return _interned.setdefault(key, len(_interned))


def _runtime_key(value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if isinstance(value, bool):  # before int: bool is an int
        return bool
    if isinstance(value, int):
        return (value == 1, value % 16 == 0, value in _INT32)
    if isinstance(value, float):
        return float
    if value is None:
        return None
    raise TypeError(f"a runtime kernel argument must be a tensor, int, float or bool: {value!r}")


class Args(NamedTuple):
    """A run of consecutive kernel arguments and the key of what Triton specializes on in them."""

    values: tuple
    key: int
    constexpr: tuple[bool, ...]  # per value: passed as a constexpr (keyed by its value)
    # `values` with every tensor replaced by its address: what a cached launch hands the
    # compiled launcher. Given a tensor, the launcher calls its data_ptr() and asks the driver
    # whether the address is device memory (cuPointerGetAttribute), per tensor and launch; given
    # an int it takes it as is. The tensors stay alive in `values`.
    raw: tuple


def _raw(values: tuple) -> tuple:
    return tuple(v.data_ptr() if isinstance(v, torch.Tensor) else v for v in values)


def runtime_args(*values: Any) -> Args:
    key = _intern(tuple(map(_runtime_key, values)))
    return Args(values, key, (False,) * len(values), _raw(values))


def constexpr_args(*values: Any) -> Args:
    return Args(values, _intern(("constexpr", *values)), (True,) * len(values), values)


def join(*groups: Args) -> Args:
    """Consecutive groups as one (computed once where they are fixed together, so a launch
    assembles fewer groups)."""
    return Args(
        sum((group.values for group in groups), ()),
        _intern(tuple(group.key for group in groups)),
        sum((group.constexpr for group in groups), ()),
        sum((group.raw for group in groups), ()),
    )


def _values(groups: tuple[Args, ...]) -> tuple:
    return sum((group.values for group in groups), ())


def _constexpr_mask(kernel: Any) -> tuple[bool, ...]:
    """Which parameters of a @triton.jit function (compiled or interpreted) are constexprs."""
    fn = getattr(kernel, "fn", kernel)
    return tuple(
        "constexpr" in str(param.annotation) for param in inspect.signature(fn).parameters.values()
    )


def _parameter_names(kernel: Any) -> list[str]:
    return list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)


def _interpreted(kernel: Any) -> bool:
    from triton.runtime.jit import JITFunction  # triton is imported by every kernel module

    return not isinstance(kernel, JITFunction)


class CachedLauncher:
    """Launches one @triton.jit kernel, caching its compiled handle per specialization key."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.name = getattr(kernel, "__name__", None) or kernel.fn.__name__
        self.constexpr = _constexpr_mask(kernel)
        # a kernel whose last parameter is `PDL` gets it from here, with launch_pdl the same
        self.takes_pdl = _parameter_names(kernel)[-1:] == ["PDL"]
        if self.takes_pdl:
            self.constexpr = self.constexpr[:-1]
        self.fallback_reason: str | None = None
        self.device: int | None = None
        self._handles: dict[tuple, tuple] = {}
        self._checked: set[tuple] = set()
        self.interpreted = _interpreted(kernel)
        if self.interpreted:
            self._fall_back("kernels run under the Triton interpreter (TRITON_INTERPRET=1)")

    def __call__(
        self, grid: tuple[int, int, int], options: tuple[int, int], *groups: Args, num_tokens: int
    ):
        """Launch on the current stream. `options`: (num_warps, num_stages); `num_tokens`: the
        tokens of the launch (a kernel taking PDL uses it for at most pdl.MAX_TOKENS)."""
        key, raw = [options], ()
        for group in groups:
            key.append(group.key)
            raw += group.raw
        tail = ()
        if self.takes_pdl:
            use_pdl = not self.interpreted and pdl.enabled_on(self._device_index(), num_tokens)
            key.append(use_pdl)
            tail = (use_pdl,)
        key = tuple(key)
        handle = self._handles.get(key)
        if handle is None:
            self._first_launch(key, grid, options, groups, _values(groups) + tail)
            return
        run, function, metadata, check = handle
        if check is not None:
            values = _values(groups)
            if _raw(values) != raw:
                raise RuntimeError(
                    f"launch of {self.name}: a tensor of its argument groups moved after the "
                    "group was made (its address and specialization key are computed then)"
                )
            check(grid, options, values + tail, handle)
        run(
            grid[0], grid[1], grid[2], torch._C._cuda_getCurrentRawStream(self.device),
            function, metadata, None, None, None, *raw, *tail,
        )  # fmt: skip

    def _device_index(self) -> int:
        return self.device if self.device is not None else torch.cuda.current_device()

    @property
    def cached_keys(self) -> int:
        return len(self._handles)

    def clear(self) -> None:
        """Forget the cached handles (the next launch of each key goes through kernel[grid])."""
        self._handles.clear()

    def _fall_back(self, reason: str) -> None:
        if self.fallback_reason is None:
            self.fallback_reason = reason
            fallback_reasons[self.name] = reason
            logger.info("triton kernel %s launches through kernel[grid]: %s", self.name, reason)

    def _check_groups(self, key: tuple, groups: tuple[Args, ...]) -> None:
        """Every group's kind matches the kernel's parameters (once per key)."""
        if key in self._checked:
            return
        kinds = sum((group.constexpr for group in groups), ())
        if kinds != self.constexpr:
            raise TypeError(
                f"launch of {self.name}: argument groups (constexpr per argument) {kinds} do "
                f"not match the kernel's parameters {self.constexpr}"
            )
        self._checked.add(key)

    def _first_launch(self, key, grid, options, groups, args) -> None:
        self._check_groups(key, groups)
        assert len(grid) == 3, "launch grids are (x, y, z)"
        num_warps, num_stages = options
        launch_pdl = {"launch_pdl": True} if self.takes_pdl and args[-1] else {}
        compiled = self.kernel[grid](
            *args, num_warps=num_warps, num_stages=num_stages, **launch_pdl
        )
        if self.fallback_reason is not None or _launch_hooks():
            return  # with launch hooks (a profiler) installed, every launch goes through Triton
        try:
            device = torch.cuda.current_device()
            if self.device is not None and device != self.device:
                raise ValueError(f"launched on device {device} after device {self.device}")
            run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
            if not callable(run) or function is None:
                raise ValueError("the compiled kernel has no launcher or no loaded function")
        except Exception as error:  # noqa: BLE001 - any surprise means: do not cache
            self._fall_back(f"compiled-kernel handle not usable ({error!r})")
            return
        self.device = device
        check = _jit_check(self, compiled) if CHECK_LAUNCHERS else None
        self._handles[key] = (run, function, metadata, check)


def _launch_hooks() -> bool:
    """Whether Triton launch hooks are installed (3.7 keeps an empty `HookChain` when none)."""
    from triton import knobs

    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _jit_check(launcher: CachedLauncher, compiled: Any):
    """A check that Triton's own path would pick `compiled` for a launch's arguments."""

    def check(grid, options, args, handle) -> None:
        launch_pdl = launcher.takes_pdl and bool(args[-1])
        picked = jit_pick(launcher.kernel, args, options, launch_pdl)
        if picked is not None and picked is not compiled:
            raise RuntimeError(
                f"cached launch of {launcher.name} would run another compiled kernel than "
                "kernel[grid]: its specialization key misses something Triton specializes on"
            )

    return check


def jit_pick(kernel: Any, args: list, options: tuple[int, int], launch_pdl: bool = False) -> Any:
    """The compiled kernel `kernel[grid](*args)` would launch now (None: not compiled yet).
    Mirrors the lookup at the top of JITFunction.run (Triton 3.6/3.7)."""
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import compute_cache_key

    kwargs = {"num_warps": options[0], "num_stages": options[1]}
    if launch_pdl:
        kwargs["launch_pdl"] = True
    kwargs["debug"] = kernel.debug or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    device = driver.active.get_current_device()
    kernel_cache, kernel_key_cache, _, _, binder = kernel.device_caches[device]
    _, specialization, bound_options = binder(*args, **kwargs)
    return kernel_cache.get(compute_cache_key(kernel_key_cache, specialization, bound_options))
