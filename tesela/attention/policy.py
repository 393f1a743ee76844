"""The attention backend policy, as data.

Each backend declares what it supports (`BackendSpec`); hardware and graph-mode limits are rows
of one rule table (`RULES`). `resolve_attention` turns a request ("auto", "triton",
"flashinfer:cutlass", ...) plus a device and the graph settings into an `AttentionDecision`:
what will actually run, with one reason line per decision. Each downgrade is logged once as a
warning on the "tesela.attention" logger.

Resolution runs the table to a fixed point: the first rule that matches and changes something
is applied and the scan starts over, so a fallback backend is checked by the same rules as a
requested one. Rules only ever downgrade, so this ends (a cycle is an internal error). KEEP rows
are then read against the final state to say why a sensitive choice was kept.

The device is a plain `DeviceInfo` value, so every rule is tested on CPU with any capability.
This module imports no torch (only `DeviceInfo.detect` does, lazily).
"""

from __future__ import annotations

import enum
import importlib.util
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from tesela.config import SUPPORTED_DTYPES, normalize_dtype

logger = logging.getLogger("tesela.attention")

DEVICE_KINDS = ("cpu", "cuda")
ANY = "*"  # a Rule's backend that matches every backend (never "auto")
AUTO = "auto"

Capability = tuple[int, int]


def sm_name(capability: Capability | None) -> str:
    """(9, 0) -> "SM90", (10, 0) -> "SM100": the names kernels and issues use."""
    return "no compute capability" if capability is None else f"SM{capability[0]}{capability[1]}"


@dataclass(frozen=True)
class DeviceInfo:
    """The device attention runs on. Tests build it directly: the capability is injectable."""

    kind: str  # "cpu" | "cuda"
    capability: Capability | None = None  # CUDA compute capability, e.g. (9, 0)
    name: str = ""
    # TRITON_INTERPRET=1: Triton kernels run (slowly) on CPU tensors, as the CPU tests do.
    triton_interpreter: bool = False

    def __post_init__(self) -> None:
        if self.kind not in DEVICE_KINDS:
            raise ValueError(
                f"unknown device kind {self.kind!r}: tesela runs on {' or '.join(DEVICE_KINDS)}"
            )
        if (self.kind == "cuda") != (self.capability is not None):
            raise ValueError(
                f"a {self.kind} device {'needs' if self.kind == 'cuda' else 'has no'} "
                f"compute capability (got {self.capability})"
            )

    @property
    def sm(self) -> str:
        return sm_name(self.capability)

    @classmethod
    def detect(cls, device: str | None = None) -> DeviceInfo:
        """Read the device from torch: `device` is "cpu", "cuda", "cuda:1" or None (auto)."""
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            torch_device = torch.device(device)
        except RuntimeError:
            raise ValueError(
                f"unknown device {device!r}: use {', '.join(DEVICE_KINDS)} or cuda:<index>"
            ) from None
        if torch_device.type == "cpu":
            return cls("cpu", None, "cpu", os.environ.get("TRITON_INTERPRET") == "1")
        if torch_device.type != "cuda":
            cls(torch_device.type)  # raises the unknown-kind error
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} asked for, but torch sees no CUDA GPU (torch "
                f"{torch.__version__}): use device 'cpu' or install a CUDA build of torch"
            )
        index = torch_device.index if torch_device.index is not None else 0
        capability = tuple(torch.cuda.get_device_capability(index))
        return cls("cuda", capability, torch.cuda.get_device_name(index))


class GraphSupport(enum.IntEnum):
    """How much CUDA graph a backend can live in, as levels (like vLLM's AttentionCGSupport)."""

    NONE = 0  # eager only: not even between piecewise graph pieces
    PIECEWISE = 1  # runs eagerly between piecewise graph pieces (static, padded buffers)
    FULL_DECODE = 2  # also inside a FULL decode graph (metadata in persistent buffers)
    ALWAYS = 3  # inside a FULL graph of any batch: extend and mixed too (fixed launch grids)


@dataclass(frozen=True)
class BackendSpec:
    """What one backend declares it supports. None means "any"."""

    name: str
    devices: tuple[str, ...]
    graph_support: GraphSupport
    dtypes: tuple[str, ...] = SUPPORTED_DTYPES
    head_dims: tuple[int, ...] | None = None
    min_capability: Capability | None = None  # CUDA only, inclusive
    max_capability: Capability | None = None  # CUDA only, exclusive
    package: str | None = None  # python package that must be importable
    install: str = ""  # how to install `package`
    variants: tuple[str, ...] = ()  # first = default
    graph_note: str = ""  # why graph support stops where it does
    # K/V read from the pool only, so the rotary kernel may store them (base.fuses_kv_store)
    fuses_kv_store: bool = False
    runs_interpreted: bool = False  # also runs on CPU under the Triton interpreter
    # tesela's own adapter module, and the variants it implements (None: every variant). A
    # declared backend or variant without them stays in the table (its rules are data) but
    # is never chosen: the policy says so and falls to one that runs.
    adapter: str | None = None
    implemented_variants: tuple[str, ...] | None = None

    @property
    def default_variant(self) -> str | None:
        return self.variants[0] if self.variants else None

    def describe(self) -> str:
        """One line of declared support, for `tesela doctor`."""
        capability = "any" if self.min_capability is None else f">= {sm_name(self.min_capability)}"
        if self.max_capability is not None:
            capability += f", < {sm_name(self.max_capability)}"
        head_dims = "any" if self.head_dims is None else ",".join(map(str, self.head_dims))
        return (
            f"devices {','.join(self.devices)}; capability {capability}; "
            f"dtypes {','.join(self.dtypes)}; head dims {head_dims}; "
            f"graphs {self.graph_support.name}; variants {','.join(self.variants) or '-'}; "
            f"KV store {'in the rotary kernel' if self.fuses_kv_store else 'in attention'}"
        )


BACKEND_SPECS: Mapping[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec(
            name="torch",
            devices=("cpu", "cuda"),
            graph_support=GraphSupport.PIECEWISE,
            graph_note="its planning allocates and loops over rows on the host",
            adapter="tesela.attention.torch_backend",
        ),
        BackendSpec(
            name="triton",
            devices=("cuda",),
            graph_support=GraphSupport.ALWAYS,
            fuses_kv_store=True,
            head_dims=(16, 32, 64, 96, 128, 256),
            min_capability=(8, 0),
            package="triton",
            install="pip install triton",
            runs_interpreted=True,
            # "tma" is the form of a hardware-limited kernel path of our own (TMA descriptors,
            # SM90+): its limit is a rule below, never an `if` in the kernel wrapper.
            variants=("plain", "tma"),
            adapter="tesela.attention.triton_backend",
            implemented_variants=("plain",),
        ),
        BackendSpec(
            name="flashinfer",
            devices=("cuda",),
            graph_support=GraphSupport.FULL_DECODE,
            dtypes=("bfloat16", "float16"),
            head_dims=(64, 128, 256),
            min_capability=(7, 5),
            package="flashinfer",
            install="pip install flashinfer-python",
            variants=("cutlass", "fa2"),  # the prefill path; decode is the same for both
            adapter="tesela.attention.flashinfer_backend",
        ),
    )
}


class Check(enum.Enum):
    """A condition read from the current backend's spec (ALWAYS: the rule's fields decide)."""

    ALWAYS = "always"
    NOT_IMPORTABLE = "not importable"
    NOT_IMPLEMENTED = "no tesela adapter"
    VARIANT_NOT_IMPLEMENTED = "variant not implemented"
    DEVICE_UNSUPPORTED = "device unsupported"
    CAPABILITY_UNSUPPORTED = "capability unsupported"
    DTYPE_UNSUPPORTED = "dtype unsupported"
    HEAD_DIM_UNSUPPORTED = "head dim unsupported"
    NO_PIECEWISE_SUPPORT = "no piecewise support"
    NO_FULL_DECODE_SUPPORT = "no full decode support"
    NO_FULL_MIXED_SUPPORT = "no full mixed support"


class Action(enum.Enum):
    KEEP = "keep"  # says why a choice stands (read against the final state)
    USE_BACKEND = "use backend"
    USE_VARIANT = "use variant"
    DISABLE_PIECEWISE = "disable piecewise graphs"
    DISABLE_FULL_DECODE = "disable full decode graphs"
    DISABLE_FULL_MIXED = "disable full mixed graphs"


@dataclass(frozen=True)
class Rule:
    """One row of the policy table: when it matches, what runs instead, and why.

    Match fields left as None match anything; `reason` is formatted with the situation
    (backend, variant, to, sm, device, gpu, dtype, head_dim, install, dtypes, head_dims,
    devices, min_sm, graph_note, decode_path, adapter).
    """

    backend: str
    reason: str
    action: Action = Action.KEEP
    to: str | None = None  # the backend (USE_BACKEND) or variant (USE_VARIANT)
    when: Check = Check.ALWAYS
    variant: str | None = None
    device: str | None = None
    min_capability: Capability | None = None  # inclusive
    max_capability: Capability | None = None  # exclusive
    piecewise: bool | None = None
    full_decode: bool | None = None
    full_mixed: bool | None = None
    warn: bool = True  # False: an expected selection, logged at info


# fmt: off
RULES: tuple[Rule, ...] = (
    # "auto" picks the fast default per device; later rows check it like any request.
    Rule(AUTO, "auto picks triton, the fast default on CUDA", Action.USE_BACKEND, "triton",
         device="cuda", warn=False),
    Rule(AUTO, "auto picks torch, the reference backend, on CPU", Action.USE_BACKEND, "torch",
         device="cpu", warn=False),
    # Device, capability, package, dtype, head dim: read from each backend's spec.
    Rule(ANY, "{backend} attention does not run on {device} (it runs on {devices}); running "
         "{to} instead", Action.USE_BACKEND, "torch", when=Check.DEVICE_UNSUPPORTED),
    Rule(ANY, "{backend} attention needs compute capability {min_sm} or later, not {gpu}; "
         "running {to} instead", Action.USE_BACKEND, "torch",
         when=Check.CAPABILITY_UNSUPPORTED),
    Rule("flashinfer", "flashinfer is not importable: install it with `{install}` (a wheel "
         "matching your torch and CUDA); running {to} instead", Action.USE_BACKEND, "triton",
         when=Check.NOT_IMPORTABLE),
    Rule("triton", "triton is not importable: install it with `{install}`; running {to} "
         "(the slow reference attention) instead", Action.USE_BACKEND, "torch",
         when=Check.NOT_IMPORTABLE),
    Rule("flashinfer", "flashinfer is declared but tesela has no adapter for it yet "
         "({adapter} is missing); running {to} instead", Action.USE_BACKEND, "triton",
         when=Check.NOT_IMPLEMENTED),
    Rule(ANY, "{backend} is declared but tesela has no adapter for it ({adapter} is missing); "
         "running {to} instead", Action.USE_BACKEND, "torch", when=Check.NOT_IMPLEMENTED),
    Rule(ANY, "{backend} attention does not support dtype {dtype} (it supports {dtypes}); "
         "running {to} instead", Action.USE_BACKEND, "torch", when=Check.DTYPE_UNSUPPORTED),
    Rule(ANY, "{backend} attention does not support head_dim {head_dim} (it supports "
         "{head_dims}); running {to} instead", Action.USE_BACKEND, "torch",
         when=Check.HEAD_DIM_UNSUPPORTED),
    # Hardware limits of kernel paths (variants).
    Rule("flashinfer", "FlashInfer's CUTLASS prefill fails TMA descriptor setup on SM100 "
         "(B200) under piecewise CUDA graphs; using its FA2 prefill path (turn piecewise "
         "graphs off to keep CUTLASS)", Action.USE_VARIANT, "fa2", variant="cutlass",
         min_capability=(10, 0), max_capability=(11, 0), piecewise=True),
    Rule("flashinfer", "FlashInfer's CUTLASS prefill targets SM90/SM100-class GPUs, not "
         "{gpu}; using its FA2 prefill path", Action.USE_VARIANT, "fa2", variant="cutlass",
         max_capability=(9, 0), warn=False),
    Rule("flashinfer", "FlashInfer's CUTLASS prefill targets SM90/SM100-class GPUs, not "
         "{gpu}; using its FA2 prefill path", Action.USE_VARIANT, "fa2", variant="cutlass",
         min_capability=(11, 0), warn=False),
    Rule("triton", "the TMA-descriptor Triton path needs Hopper (SM90) or later, not {gpu}; "
         "using the plain Triton path", Action.USE_VARIANT, "plain", variant="tma",
         max_capability=(9, 0)),
    Rule("triton", "the TMA-descriptor Triton path is declared but not implemented in tesela "
         "yet; using the plain Triton path", Action.USE_VARIANT, "plain", variant="tma",
         when=Check.VARIANT_NOT_IMPLEMENTED),
    # Graph modes: keep the backend the user chose, give up the graph mode it cannot serve.
    Rule(ANY, "no CUDA graphs on CPU; decode batches run {decode_path}",
         Action.DISABLE_FULL_DECODE, device="cpu", full_decode=True, warn=False),
    Rule(ANY, "{backend} attention cannot run inside a FULL decode graph ({graph_note}); "
         "decode batches run {decode_path}", Action.DISABLE_FULL_DECODE,
         when=Check.NO_FULL_DECODE_SUPPORT, full_decode=True),
    Rule(ANY, "no CUDA graphs on CPU; extend and mixed batches run {mixed_path}",
         Action.DISABLE_FULL_MIXED, device="cpu", full_mixed=True, warn=False),
    Rule(ANY, "{backend} attention cannot run extend or mixed batches inside a FULL graph "
         "({graph_note}); they run {mixed_path}", Action.DISABLE_FULL_MIXED,
         when=Check.NO_FULL_MIXED_SUPPORT, full_mixed=True, warn=False),  # the usual split
    Rule(ANY, "{backend} attention cannot run between piecewise graph pieces ({graph_note}); "
         "extend batches run eagerly", Action.DISABLE_PIECEWISE,
         when=Check.NO_PIECEWISE_SUPPORT, piecewise=True),
    # Why sensitive choices stand.
    Rule("flashinfer", "SM100 without piecewise graphs keeps FlashInfer's CUTLASS prefill (its "
         "TMA descriptor setup fails only under piecewise graphs)", variant="cutlass",
         min_capability=(10, 0), max_capability=(11, 0), piecewise=False),
    Rule("flashinfer", "SM90 keeps FlashInfer's CUTLASS prefill, with or without piecewise "
         "graphs", variant="cutlass", min_capability=(9, 0), max_capability=(10, 0)),
    Rule("triton", "{gpu} supports the TMA-descriptor Triton path (SM90 or later)",
         variant="tma", min_capability=(9, 0)),
)
# fmt: on


@dataclass(frozen=True)
class AttentionDecision:
    """What will run: the backend, its variant and the graph modes, with the reasons."""

    requested: str
    backend: str
    variant: str | None
    piecewise: bool
    full_decode: bool
    reasons: tuple[str, ...]  # one line per decision, kept decisions included
    changes: tuple[str, ...] = ()  # the lines where something differs from the request
    downgrades: tuple[str, ...] = ()  # the changes logged as warnings (the rest: info)
    full_mixed: bool = False  # FULL graphs for extend and mixed batches

    @property
    def name(self) -> str:
        """The request form of this decision ("triton:plain"), accepted back by resolve."""
        return self.backend if self.variant is None else f"{self.backend}:{self.variant}"

    def summary(self) -> str:
        on = {True: "on", False: "off"}
        return (
            f"{self.name}, piecewise graphs {on[self.piecewise]}, "
            f"FULL decode graphs {on[self.full_decode]}, FULL mixed graphs {on[self.full_mixed]}"
        )


def package_importable(package: str) -> bool:
    """True when `package` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def implemented_here(spec: BackendSpec, variant: str | None = None) -> bool:
    """True when tesela has `spec`'s adapter module and implements `variant` (None: any)."""
    if spec.adapter is not None and not package_importable(spec.adapter):
        return False
    return (
        variant is None
        or spec.implemented_variants is None
        or (variant in spec.implemented_variants)
    )


def availability(
    spec: BackendSpec,
    importable: Callable[[str], bool] = package_importable,
    implemented: Callable[[BackendSpec, str | None], bool] = implemented_here,
) -> str:
    """One line: can this declared backend (and which of its variants) run here, and if not,
    why (for `tesela doctor`)."""
    missing = []
    if spec.package is not None and not importable(spec.package):
        missing.append(f"package {spec.package} not installed ({spec.install})")
    if not implemented(spec, None):
        missing.append(f"no tesela adapter yet ({spec.adapter})")
    if missing:
        return "declared, unavailable here: " + "; ".join(missing)
    unimplemented = [v for v in spec.variants if not implemented(spec, v)]
    if unimplemented:
        return f"available; variant(s) {', '.join(unimplemented)} declared, not implemented"
    return "available"


@dataclass(frozen=True)
class _State:
    backend: str
    variant: str | None
    piecewise: bool
    full_decode: bool
    full_mixed: bool = False


@dataclass(frozen=True)
class _Change:
    attribute: str  # a _State field
    line: str
    warn: bool


@dataclass(frozen=True)
class _Situation:
    device: DeviceInfo
    dtype: str
    head_dim: int
    importable: Callable[[str], bool]
    specs: Mapping[str, BackendSpec]
    implemented: Callable[[BackendSpec, str | None], bool] = implemented_here


def resolve_attention(
    requested: str,
    device: DeviceInfo,
    *,
    dtype: str,
    head_dim: int,
    piecewise: bool,
    full_decode: bool,
    full_mixed: bool = False,
    importable: Callable[[str], bool] = package_importable,
    implemented: Callable[[BackendSpec, str | None], bool] = implemented_here,
    rules: tuple[Rule, ...] = RULES,
    specs: Mapping[str, BackendSpec] = BACKEND_SPECS,
    log: bool = True,
) -> AttentionDecision:
    """Resolve a request ("auto", "<backend>" or "<backend>:<variant>") to what will run.

    Raises ValueError for an unknown backend or variant. With `log`, each downgrade is logged
    once per process as a warning on "tesela.attention". `importable` (packages) and
    `implemented` (tesela's adapters and variants) are injectable, like the device, so that
    every rule is tested as data.
    """
    if not isinstance(device, DeviceInfo):
        raise TypeError(f"device must be a DeviceInfo (DeviceInfo.detect(...)), got {device!r}")
    backend, variant = parse_request(requested, specs)
    explicit_variant = variant is not None
    if backend != AUTO:
        variant = variant or specs[backend].default_variant
    situation = _Situation(
        device, normalize_dtype(dtype), int(head_dim), importable, specs, implemented
    )
    state = _State(backend, variant, bool(piecewise), bool(full_decode), bool(full_mixed))
    state, changes = _run_to_fixed_point(state, situation, rules, explicit_variant)
    reasons = [c.line for c in changes] + _kept_lines(state, situation, rules, changes)
    decision = AttentionDecision(
        requested=requested,
        backend=state.backend,
        variant=state.variant,
        piecewise=state.piecewise,
        full_decode=state.full_decode,
        full_mixed=state.full_mixed,
        reasons=tuple(reasons),
        changes=tuple(c.line for c in changes),
        downgrades=tuple(c.line for c in changes if c.warn),
    )
    if log:
        _log_changes(changes)
    return decision


def parse_request(
    requested: str, specs: Mapping[str, BackendSpec] = BACKEND_SPECS
) -> tuple[str, str | None]:
    """Split a request: "flashinfer:fa2" -> ("flashinfer", "fa2"), "triton" -> ("triton", None)."""
    backend, _, variant = str(requested).strip().lower().partition(":")
    if backend != AUTO and backend not in specs:
        raise ValueError(
            f"unknown attention backend {requested!r}: choose one of "
            f"{', '.join([AUTO, *specs])} (optionally <backend>:<variant>)"
        )
    if not variant:
        return backend, None
    choices = () if backend == AUTO else specs[backend].variants
    if variant not in choices:
        valid = f"one of {', '.join(choices)}" if choices else "none (give the backend alone)"
        raise ValueError(f"unknown variant {variant!r} of attention backend {backend!r}: {valid}")
    return backend, variant


def _run_to_fixed_point(
    state: _State, situation: _Situation, rules: tuple[Rule, ...], explicit_variant: bool
) -> tuple[_State, list[_Change]]:
    changes: list[_Change] = []
    seen = {state}
    while (rule := _first_change(state, situation, rules)) is not None:
        new_state = _apply(rule, state, situation.specs)
        attribute = _changed_attribute(state, new_state)
        before, after = _show(getattr(state, attribute)), _show(getattr(new_state, attribute))
        line = f"{_LABELS[attribute]} {before} -> {after}: {_reason(rule, state, situation)}"
        # A variant the user named is a promise: changing it is a downgrade, whatever the row.
        warn = rule.warn or (attribute == "variant" and explicit_variant)
        changes.append(_Change(attribute, line, warn))
        if new_state in seen:
            raise RuntimeError(f"attention policy rules loop at {new_state}: {line}")
        seen.add(new_state)
        state = new_state
    return state, changes


def _first_change(state: _State, situation: _Situation, rules: tuple[Rule, ...]) -> Rule | None:
    for rule in rules:
        if rule.action is not Action.KEEP and _matches(rule, state, situation):
            return rule
    return None


def _matches(rule: Rule, state: _State, situation: _Situation) -> bool:
    device = situation.device
    if rule.backend != state.backend and not (rule.backend == ANY and state.backend != AUTO):
        return False
    if rule.variant is not None and rule.variant != state.variant:
        return False
    if rule.device is not None and rule.device != device.kind:
        return False
    if (rule.min_capability or rule.max_capability) and device.capability is None:
        return False
    if rule.min_capability is not None and device.capability < rule.min_capability:
        return False
    if rule.max_capability is not None and device.capability >= rule.max_capability:
        return False
    if rule.piecewise is not None and rule.piecewise != state.piecewise:
        return False
    if rule.full_decode is not None and rule.full_decode != state.full_decode:
        return False
    if rule.full_mixed is not None and rule.full_mixed != state.full_mixed:
        return False
    if rule.when is Check.ALWAYS:
        return True
    return _check(rule.when, situation.specs[state.backend], situation, state.variant)


def _check(check: Check, spec: BackendSpec, situation: _Situation, variant: str | None) -> bool:
    """True when `spec` fails `check` in this situation."""
    device = situation.device
    if check is Check.NOT_IMPORTABLE:
        return spec.package is not None and not situation.importable(spec.package)
    if check is Check.NOT_IMPLEMENTED:
        return not situation.implemented(spec, None)
    if check is Check.DEVICE_UNSUPPORTED:
        interpreted = device.kind == "cpu" and device.triton_interpreter and spec.runs_interpreted
        return device.kind not in spec.devices and not interpreted
    if check is Check.CAPABILITY_UNSUPPORTED:
        capability = device.capability
        if capability is None:  # CPU: only the device check applies
            return False
        too_old = spec.min_capability is not None and capability < spec.min_capability
        too_new = spec.max_capability is not None and capability >= spec.max_capability
        return too_old or too_new
    if check is Check.DTYPE_UNSUPPORTED:
        return situation.dtype not in spec.dtypes
    if check is Check.HEAD_DIM_UNSUPPORTED:
        return spec.head_dims is not None and situation.head_dim not in spec.head_dims
    if check is Check.VARIANT_NOT_IMPLEMENTED:
        return not situation.implemented(spec, variant)
    if check is Check.NO_PIECEWISE_SUPPORT:
        return spec.graph_support < GraphSupport.PIECEWISE
    if check is Check.NO_FULL_DECODE_SUPPORT:
        return spec.graph_support < GraphSupport.FULL_DECODE
    if check is Check.NO_FULL_MIXED_SUPPORT:
        return spec.graph_support < GraphSupport.ALWAYS
    raise AssertionError(f"unhandled check {check}")


def _apply(rule: Rule, state: _State, specs: Mapping[str, BackendSpec]) -> _State:
    if rule.action is Action.USE_BACKEND:
        return replace(state, backend=rule.to, variant=specs[rule.to].default_variant)
    if rule.action is Action.USE_VARIANT:
        return replace(state, variant=rule.to)
    if rule.action is Action.DISABLE_PIECEWISE:
        return replace(state, piecewise=False)
    if rule.action is Action.DISABLE_FULL_DECODE:
        return replace(state, full_decode=False)
    if rule.action is Action.DISABLE_FULL_MIXED:
        return replace(state, full_mixed=False)
    raise AssertionError(f"a KEEP rule changes nothing: {rule}")


_LABELS = {
    "backend": "backend",
    "variant": "variant",
    "piecewise": "piecewise graphs",
    "full_decode": "FULL decode graphs",
    "full_mixed": "FULL mixed graphs",
}


def _changed_attribute(old: _State, new: _State) -> str:
    """The first _State field a rule changed (a backend change also resets the variant)."""
    for attribute in _LABELS:
        if getattr(old, attribute) != getattr(new, attribute):
            return attribute
    raise AssertionError(f"rule changed nothing: {old}")


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "-" if value is None else str(value)


def _reason(rule: Rule, state: _State, situation: _Situation) -> str:
    spec = situation.specs[state.backend] if state.backend != AUTO else None
    device = situation.device
    fields = {
        "backend": state.backend,
        "variant": state.variant,
        "to": rule.to,
        "sm": device.sm,
        "device": device.kind,
        "gpu": f"{device.name} ({device.sm})" if device.name else device.sm,
        "dtype": situation.dtype,
        "head_dim": situation.head_dim,
        "decode_path": "piecewise" if state.piecewise else "eagerly",
        "mixed_path": "piecewise" if state.piecewise else "eagerly",
        "install": spec.install if spec else "",
        "devices": ", ".join(spec.devices) if spec else "",
        "dtypes": ", ".join(spec.dtypes) if spec else "",
        "head_dims": ", ".join(map(str, spec.head_dims or ())) if spec else "",
        "min_sm": sm_name(spec.min_capability) if spec and spec.min_capability else "",
        "graph_note": (spec.graph_note if spec else "") or "declared by the backend",
        "adapter": (spec.adapter or "") if spec else "",
    }
    return rule.reason.format(**fields)


def _kept_lines(
    state: _State, situation: _Situation, rules: tuple[Rule, ...], changes: list[_Change]
) -> list[str]:
    """A line for every decision no rule changed: a KEEP row's reason, or the spec's word."""
    changed = {change.attribute for change in changes}
    spec = situation.specs[state.backend]
    lines = []
    if "backend" not in changed:
        lines.append(f"backend {state.backend} kept: {_backend_fits(situation)}")
    keep_rules = [r for r in rules if r.action is Action.KEEP and _matches(r, state, situation)]
    lines += [f"variant {state.variant} kept: {_reason(r, state, situation)}" for r in keep_rules]
    if state.variant is not None and not keep_rules and "variant" not in changed:
        lines.append(f"variant {state.variant} kept: no rule limits it on {situation.device.sm}")
    for attribute in ("piecewise", "full_decode", "full_mixed"):
        if attribute not in changed:
            lines.append(_graph_kept_line(_LABELS[attribute], getattr(state, attribute), spec))
    return lines


def _backend_fits(situation: _Situation) -> str:
    device = situation.device
    where = device.kind if device.capability is None else f"{device.kind} {device.sm}"
    return f"supports {where}, {situation.dtype}, head_dim {situation.head_dim}"


def _graph_kept_line(label: str, on: bool, spec: BackendSpec) -> str:
    if not on:
        return f"{label} off: not requested"
    return f"{label} on: {spec.name} declares {spec.graph_support.name} graph support"


_logged: set[str] = set()


def _log_changes(changes: list[_Change]) -> None:
    """Log each change once per process: downgrades as warnings, selections as info."""
    for change in changes:
        if change.line in _logged:
            continue
        _logged.add(change.line)
        logger.log(logging.WARNING if change.warn else logging.INFO, "attention: %s", change.line)


def forget_logged() -> None:
    """Let already-logged downgrades be logged again (tests; a process that reconfigures)."""
    _logged.clear()


def unavailable_message(name: str, specs: Mapping[str, BackendSpec] = BACKEND_SPECS) -> str:
    """Why `name` cannot be built here, how to install it, and what the policy runs instead."""
    spec = specs[name]
    instead = [
        f"{rule.to} on {rule.device or ', '.join(spec.devices)}"
        for rule in RULES
        if rule.backend == name and rule.when is Check.NOT_IMPORTABLE
    ]
    return (
        f"attention backend {name!r} needs the {spec.package!r} package, which is not "
        f"importable: install it with `{spec.install}`. Until then, asking for {name!r} runs "
        f"{' / '.join(instead) or 'torch'} instead (tesela.attention.policy.resolve_attention "
        "decides; `tesela doctor` shows the decision)."
    )
