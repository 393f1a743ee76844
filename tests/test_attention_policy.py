"""The attention policy table, rule by rule, on CPU with injected compute capabilities."""

from __future__ import annotations

import itertools
import logging
import os
import re

import pytest

from tesela.attention import policy
from tesela.attention.policy import (
    BACKEND_SPECS,
    RULES,
    Action,
    BackendSpec,
    DeviceInfo,
    GraphSupport,
    resolve_attention,
)

CPU = DeviceInfo("cpu")
SM75, SM80, SM90 = (
    DeviceInfo("cuda", (7, 5)),
    DeviceInfo("cuda", (8, 0)),
    DeviceInfo("cuda", (9, 0)),
)
B200 = DeviceInfo("cuda", (10, 0), "NVIDIA B200")
SM103, SM120 = DeviceInfo("cuda", (10, 3)), DeviceInfo("cuda", (12, 0))
# A backend with no graph support, so the rule that turns piecewise graphs off is exercised.
EAGER_ONLY = BackendSpec(name="eager", devices=("cpu", "cuda"), graph_support=GraphSupport.NONE)
SPECS = {**BACKEND_SPECS, "eager": EAGER_ONLY}


def everything(_package: str) -> bool:
    return True


def missing(*packages: str):
    return lambda package: package not in packages


def all_implemented(_spec, _variant) -> bool:
    """Every declared adapter and variant present: the hardware rules show, as data."""
    return True


def resolve(requested, device, **overrides):
    settings = dict(dtype="bfloat16", head_dim=128, piecewise=True, full_decode=True)
    settings.setdefault("importable", everything)
    settings.setdefault("implemented", all_implemented)
    settings.update(overrides)
    return resolve_attention(requested, device, **settings)


@pytest.fixture(autouse=True)
def fresh_warnings():
    policy.forget_logged()
    yield
    policy.forget_logged()


# --- the rule of record: FlashInfer CUTLASS prefill x SM100 x piecewise graphs -------------


@pytest.mark.parametrize("device", [B200, SM103])
def test_sm100_with_piecewise_uses_fa2_and_says_why(device):
    decision = resolve("flashinfer", device, piecewise=True)
    assert (decision.backend, decision.variant) == ("flashinfer", "fa2")
    assert decision.piecewise and decision.full_decode
    (line,) = decision.downgrades
    assert line.startswith("variant cutlass -> fa2:")
    assert "TMA descriptor" in line and "SM100" in line and "piecewise" in line


def test_sm100_without_piecewise_keeps_cutlass():
    decision = resolve("flashinfer", B200, piecewise=False)
    assert (decision.backend, decision.variant, decision.piecewise) == (
        "flashinfer",
        "cutlass",
        False,
    )
    assert decision.downgrades == ()
    assert any(
        r.startswith("variant cutlass kept:") and "SM100 without piecewise" in r
        for r in decision.reasons
    )


@pytest.mark.parametrize("piecewise", [True, False])
def test_sm90_keeps_cutlass(piecewise):
    decision = resolve("flashinfer:cutlass", SM90, piecewise=piecewise)
    assert decision.variant == "cutlass" and decision.downgrades == ()
    assert any(r.startswith("variant cutlass kept: SM90") for r in decision.reasons)


@pytest.mark.parametrize("device", [SM80, SM120])
def test_cutlass_outside_sm90_sm100_class_uses_fa2_without_warning(device):
    decision = resolve("flashinfer", device)
    assert decision.variant == "fa2"
    assert decision.downgrades == ()  # the default path for this GPU, not a downgrade
    assert "SM90/SM100-class" in decision.changes[0] and device.sm in decision.changes[0]


def test_explicit_cutlass_below_sm90_is_a_warned_downgrade():
    decision = resolve("flashinfer:cutlass", SM80)
    assert decision.variant == "fa2"
    assert len(decision.downgrades) == 1 and "SM80" in decision.downgrades[0]


def test_explicit_fa2_on_sm100_is_kept():
    decision = resolve("flashinfer:fa2", B200)
    assert decision.variant == "fa2" and decision.changes == ()


# --- packages that are not importable ------------------------------------------------------


def test_flashinfer_missing_falls_back_to_triton_with_install_hint():
    decision = resolve("flashinfer", SM90, importable=missing("flashinfer"))
    assert (decision.backend, decision.variant) == ("triton", "plain")
    assert decision.full_decode
    (line,) = decision.downgrades
    assert line.startswith("backend flashinfer -> triton:")
    assert "pip install flashinfer-python" in line and "running triton instead" in line


def test_flashinfer_and_triton_missing_fall_back_to_torch():
    decision = resolve("flashinfer", SM90, importable=missing("flashinfer", "triton"))
    assert decision.backend == "torch" and decision.variant is None
    assert [line.split(":")[0] for line in decision.downgrades] == [
        "backend flashinfer -> triton",
        "backend triton -> torch",
        "FULL decode graphs on -> off",
    ]


def test_triton_missing_falls_back_to_torch_with_install_hint():
    decision = resolve("triton", SM90, importable=missing("triton"))
    assert decision.backend == "torch"
    assert "pip install triton" in decision.downgrades[0]


def test_default_importable_checks_real_packages():
    decision = resolve_attention(
        "triton", SM90, dtype="bf16", head_dim=128, piecewise=True, full_decode=True
    )
    expected = "triton" if policy.package_importable("triton") else "torch"
    assert decision.backend == expected


# --- devices, capabilities, dtypes, head dims ----------------------------------------------


@pytest.mark.parametrize("requested", ["triton", "flashinfer", "flashinfer:cutlass", "triton:tma"])
def test_cuda_only_backend_on_cpu_runs_torch(requested):
    decision = resolve(requested, CPU, importable=missing("triton", "flashinfer"))
    assert decision.backend == "torch"
    line = decision.downgrades[0]
    assert "does not run on cpu" in line and "install" not in line  # the device is the reason


def test_triton_below_sm80_runs_torch():
    decision = resolve("triton", SM75)
    assert decision.backend == "torch"
    assert "compute capability SM80 or later, not SM75" in decision.downgrades[0]


def test_flashinfer_on_sm75_falls_back_through_triton_to_torch():
    decision = resolve("flashinfer", SM75, importable=missing("flashinfer"))
    assert decision.backend == "torch"
    assert decision.changes[1].startswith("backend triton -> torch: triton attention needs")


def test_unsupported_dtype_runs_torch():
    decision = resolve("flashinfer", SM90, dtype="float32")
    assert decision.backend == "torch"
    assert (
        "dtype float32" in decision.downgrades[0] and "bfloat16, float16" in decision.downgrades[0]
    )


@pytest.mark.parametrize("requested", ["triton", "flashinfer"])
def test_unsupported_head_dim_runs_torch(requested):
    decision = resolve(requested, SM90, head_dim=80)
    assert decision.backend == "torch"
    assert "head_dim 80" in decision.downgrades[0]


def test_dtype_aliases_are_accepted():
    assert resolve("triton", SM90, dtype="bf16").backend == "triton"
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        resolve("triton", SM90, dtype="int8")


# --- graph modes ---------------------------------------------------------------------------


def test_torch_on_cuda_keeps_backend_and_disables_full_decode():
    decision = resolve("torch", SM90)
    assert (decision.backend, decision.piecewise, decision.full_decode) == ("torch", True, False)
    (line,) = decision.downgrades
    assert line.startswith("FULL decode graphs on -> off:")
    assert "planning" in line and "decode batches run piecewise" in line


def test_torch_without_piecewise_says_decode_runs_eagerly():
    decision = resolve("torch", SM90, piecewise=False)
    assert "decode batches run eagerly" in decision.downgrades[0]


def test_cpu_has_no_full_decode_graphs_and_does_not_warn():
    decision = resolve("torch", CPU)
    assert (decision.piecewise, decision.full_decode) == (True, False)
    assert decision.downgrades == () and "no CUDA graphs on CPU" in decision.changes[0]


def test_backend_without_piecewise_support_keeps_backend_and_disables_piecewise():
    decision = resolve("eager", SM90, specs=SPECS)
    assert (decision.backend, decision.piecewise, decision.full_decode) == (
        "eager",
        False,
        False,
    )
    assert any(line.startswith("piecewise graphs on -> off:") for line in decision.downgrades)


def test_graph_modes_not_requested_stay_off():
    decision = resolve("triton", SM90, piecewise=False, full_decode=False)
    assert (decision.piecewise, decision.full_decode) == (False, False)
    assert "piecewise graphs off: not requested" in decision.reasons


# --- our own kernel path's hardware limit (the form, with Triton's TMA path) ----------------


def test_triton_tma_below_sm90_uses_plain_path():
    decision = resolve("triton:tma", SM80)
    assert (decision.backend, decision.variant) == ("triton", "plain")
    assert "TMA-descriptor Triton path needs Hopper (SM90)" in decision.downgrades[0]


def test_triton_tma_on_sm90_is_kept():
    decision = resolve("triton:tma", SM90)
    assert decision.variant == "tma" and decision.changes == ()
    assert any("supports the TMA-descriptor Triton path" in r for r in decision.reasons)


# --- what tesela does not implement is never kept ----------------------------------------


def test_triton_tma_is_declared_but_not_implemented_so_plain_runs():
    decision = resolve("triton:tma", SM90, implemented=policy.implemented_here)
    assert (decision.backend, decision.variant) == ("triton", "plain")
    assert "declared but not implemented" in decision.downgrades[0]


def test_flashinfer_without_adapter_falls_to_triton_and_says_so():
    decision = resolve("flashinfer", B200, implemented=policy.implemented_here)
    if policy.implemented_here(BACKEND_SPECS["flashinfer"]):
        pytest.skip("this build has a flashinfer adapter")
    assert (decision.backend, decision.variant) == ("triton", "plain")
    line = decision.downgrades[0]
    assert line.startswith("backend flashinfer -> triton:")
    assert "no adapter" in line and "tesela.attention.flashinfer_backend" in line


def test_what_is_built_here_is_implemented():
    assert policy.implemented_here(BACKEND_SPECS["torch"], None)
    assert policy.implemented_here(BACKEND_SPECS["triton"], "plain")
    assert not policy.implemented_here(BACKEND_SPECS["triton"], "tma")
    from tesela.attention.registry import _BACKENDS

    for name, spec in BACKEND_SPECS.items():  # the table and the registry name one module
        assert spec.adapter == _BACKENDS[name][0]


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_each_adapter_declares_what_the_table_says(name):
    """The class the registry builds supports the graphs and the KV store its row declares."""
    pytest.importorskip(name)
    from tesela.attention.registry import backend_class

    spec, cls = BACKEND_SPECS[name], backend_class(name)
    assert cls.cuda_graph_support is spec.graph_support
    assert cls.fuses_kv_store is spec.fuses_kv_store
    assert ("KV store in the rotary kernel" in spec.describe()) is spec.fuses_kv_store


def test_availability_lines_name_what_is_missing():
    triton, flashinfer = BACKEND_SPECS["triton"], BACKEND_SPECS["flashinfer"]
    assert policy.availability(BACKEND_SPECS["torch"]) == "available"
    assert policy.availability(triton, everything) == (
        "available; variant(s) tma declared, not implemented"
    )
    line = policy.availability(flashinfer, missing("flashinfer"))
    assert line.startswith("declared, unavailable here: package flashinfer not installed")
    assert "no tesela adapter yet (tesela.attention.flashinfer_backend)" in line
    assert policy.availability(flashinfer, everything, all_implemented) == "available"


def test_triton_runs_on_cpu_only_under_the_interpreter():
    interpreted = DeviceInfo("cpu", triton_interpreter=True)
    decision = resolve("triton", interpreted, dtype="float32", head_dim=16)
    assert (decision.backend, decision.full_decode) == ("triton", False)
    assert resolve("triton", CPU, dtype="float32", head_dim=16).backend == "torch"
    assert resolve("flashinfer", interpreted).backend == "torch"  # not a Triton backend
    assert resolve("auto", interpreted).backend == "torch"  # auto keeps the reference on CPU


# --- auto ----------------------------------------------------------------------------------


def test_auto_on_cpu_is_torch():
    decision = resolve("auto", CPU)
    assert decision.backend == "torch" and decision.downgrades == ()
    assert (
        decision.reasons[0]
        == "backend auto -> torch: auto picks torch, the reference backend, on CPU"
    )


def test_auto_on_cuda_is_triton_with_full_decode_graphs():
    decision = resolve("auto", SM90, full_mixed=True)
    assert decision.summary() == (
        "triton:plain, piecewise graphs on, FULL decode graphs on, FULL mixed graphs on"
    )
    assert decision.downgrades == ()


def test_full_mixed_graphs_need_always_graph_support():
    for backend, device in (("torch", SM90), ("flashinfer", SM90), ("triton", CPU)):
        decision = resolve(backend, device, full_mixed=True)
        assert not decision.full_mixed
        (line,) = [c for c in decision.changes if c.startswith("FULL mixed graphs on -> off")]
        assert "piecewise" in line  # says where extend and mixed batches run instead
        assert decision.downgrades == () or "FULL mixed" not in decision.downgrades[0]
    assert resolve("triton", SM90, full_mixed=True).full_mixed


def test_auto_on_cuda_without_triton_warns_and_runs_torch():
    decision = resolve("auto", SM90, importable=missing("triton"))
    assert decision.backend == "torch"
    assert "pip install triton" in decision.downgrades[0]


def test_every_decision_has_a_line_per_decision():
    decision = resolve("triton", SM90, full_mixed=True)
    assert [line.split(" kept")[0].split(" on:")[0] for line in decision.reasons] == [
        "backend triton",
        "variant plain",
        "piecewise graphs",
        "FULL decode graphs",
        "FULL mixed graphs",
    ]


# --- user errors ---------------------------------------------------------------------------


def test_unknown_backend_lists_the_choices():
    with pytest.raises(
        ValueError, match=r"unknown attention backend 'vllm'.*auto, torch, triton, flashinfer"
    ):
        resolve("vllm", SM90)


def test_unknown_variant_lists_the_variants():
    with pytest.raises(ValueError, match=r"unknown variant 'fa3'.*cutlass, fa2"):
        resolve("flashinfer:fa3", SM90)
    with pytest.raises(ValueError, match="give the backend alone"):
        resolve("torch:fast", SM90)


def test_unknown_device_kind_lists_the_kinds():
    with pytest.raises(ValueError, match="unknown device kind 'tpu': tesela runs on cpu or cuda"):
        DeviceInfo("tpu")
    with pytest.raises(ValueError, match="unknown device kind 'mps'"):
        DeviceInfo.detect("mps")
    with pytest.raises(ValueError, match="unknown device 'tpu0'"):
        DeviceInfo.detect("tpu0")


def test_cuda_device_needs_a_capability():
    with pytest.raises(ValueError, match="needs compute capability"):
        DeviceInfo("cuda")
    with pytest.raises(TypeError, match="DeviceInfo"):
        resolve("auto", "cuda")


def test_detect_reads_torch():
    import torch

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    assert DeviceInfo.detect("cpu") == DeviceInfo("cpu", None, "cpu", interpreted)
    if not torch.cuda.is_available():
        assert DeviceInfo.detect(None).kind == "cpu"
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            DeviceInfo.detect("cuda:0")


# --- logging -------------------------------------------------------------------------------


def test_each_downgrade_is_logged_once_as_a_warning(caplog):
    caplog.set_level(logging.INFO, logger="tesela.attention")
    for _ in range(3):
        resolve("flashinfer", B200, piecewise=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "TMA descriptor" in warnings[0].getMessage()
    resolve("flashinfer", SM80)  # a selection, not a downgrade: info
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "cutlass -> fa2" in infos[0].getMessage()


def test_log_false_logs_nothing(caplog):
    caplog.set_level(logging.DEBUG, logger="tesela.attention")
    resolve("flashinfer", B200, log=False)
    assert caplog.records == []


# --- the table as a whole ------------------------------------------------------------------


def test_rule_targets_name_declared_backends_and_variants():
    for rule in RULES:
        assert rule.backend in (policy.AUTO, policy.ANY) or rule.backend in BACKEND_SPECS, rule
        if rule.action is Action.USE_BACKEND:
            assert rule.to in BACKEND_SPECS, rule
        if rule.action is Action.USE_VARIANT:
            assert rule.to in BACKEND_SPECS[rule.backend].variants, rule
        if rule.variant is not None:
            assert rule.variant in BACKEND_SPECS[rule.backend].variants, rule


def _grid():
    devices = [CPU, SM75, SM80, SM90, B200, SM103, SM120]
    requests = ["auto", "torch", "eager", "triton", "triton:tma"]
    requests += ["flashinfer", "flashinfer:cutlass", "flashinfer:fa2"]
    availability = [everything, missing("flashinfer"), missing("flashinfer", "triton")]
    no_triton_adapter = lambda spec, _: spec.name not in ("triton", "flashinfer")  # noqa: E731
    adapters = [all_implemented, policy.implemented_here, no_triton_adapter]
    flags = [True, False]
    shapes = [("bfloat16", 128), ("float32", 128), ("float16", 80)]
    grid = itertools.product(requests, devices, availability, adapters, flags, flags, flags, shapes)
    for requested, device, importable, implemented, piecewise, full_decode, mixed, shape in grid:
        settings = dict(dtype=shape[0], head_dim=shape[1], piecewise=piecewise, full_mixed=mixed)
        settings.update(importable=importable, implemented=implemented, full_decode=full_decode)
        yield requested, device, settings


def _template_regex(template: str) -> re.Pattern:
    literal_parts = re.split(r"\{\w+\}", template)
    return re.compile(".*".join(re.escape(part) for part in literal_parts))


def test_every_rule_fires_and_every_decision_is_sound():
    fired = set()
    patterns = {rule: _template_regex(rule.reason) for rule in RULES}
    for requested, device, settings in _grid():
        decision = resolve_attention(requested, device, specs=SPECS, log=False, **settings)
        _assert_sound(decision, device, settings)
        for rule, pattern in patterns.items():
            if any(pattern.search(reason) for reason in decision.reasons):
                fired.add(rule)
    assert [rule for rule in RULES if rule not in fired] == []


def _assert_sound(decision, device, settings):
    spec = SPECS[decision.backend]
    assert device.kind in spec.devices
    assert spec.package is None or settings["importable"](spec.package)
    assert settings["implemented"](spec, decision.variant)  # never picks what cannot be built
    assert settings["dtype"] in spec.dtypes
    assert spec.head_dims is None or settings["head_dim"] in spec.head_dims
    full_decode_ok = spec.graph_support >= GraphSupport.FULL_DECODE and device.kind == "cuda"
    assert decision.full_decode == (settings["full_decode"] and full_decode_ok)
    piecewise_ok = spec.graph_support >= GraphSupport.PIECEWISE
    assert decision.piecewise == (settings["piecewise"] and piecewise_ok)
    full_mixed_ok = spec.graph_support >= GraphSupport.ALWAYS and device.kind == "cuda"
    assert decision.full_mixed == (settings.get("full_mixed", False) and full_mixed_ok)
    on_sm100 = device.capability is not None and (10, 0) <= device.capability < (11, 0)
    assert not (decision.variant == "cutlass" and on_sm100 and decision.piecewise)
    # What was decided resolves to itself, with nothing left to change.
    graphs = dict(
        piecewise=decision.piecewise,
        full_decode=decision.full_decode,
        full_mixed=decision.full_mixed,
    )
    again = resolve_attention(
        decision.name, device, specs=SPECS, log=False, **{**settings, **graphs}
    )
    assert (again.name, again.piecewise, again.full_decode, again.full_mixed) == (
        decision.name,
        *graphs.values(),
    )
    assert again.changes == ()


# --- the registry --------------------------------------------------------------------------


def test_registry_names_match_the_specs():
    from tesela.attention.registry import backend_names, backend_spec

    assert set(backend_names()) == set(BACKEND_SPECS)
    assert backend_spec("triton").graph_support is GraphSupport.ALWAYS
    assert backend_spec("flashinfer").graph_support is GraphSupport.FULL_DECODE
    assert backend_spec("torch").graph_support is GraphSupport.PIECEWISE
    assert backend_spec("flashinfer").variants == ("cutlass", "fa2")


def test_registry_flashinfer_says_how_to_install_and_what_runs_instead():
    from tesela.attention.registry import BackendUnavailableError, backend_class

    if policy.package_importable("flashinfer"):
        pytest.skip("flashinfer is installed here")
    with pytest.raises(ImportError) as error:
        backend_class("flashinfer")
    assert isinstance(error.value, BackendUnavailableError)
    message = str(error.value)
    assert "pip install flashinfer-python" in message and "runs triton on cuda instead" in message


def test_registry_user_errors():
    from tesela.attention.registry import backend_class, backend_spec

    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        backend_class("nope")
    with pytest.raises(ValueError, match="'auto' is not a backend"):
        backend_spec("auto")


def test_registry_builds_torch():
    from tesela.attention.registry import backend_class
    from tesela.attention.torch_backend import TorchAttentionBackend

    assert backend_class("torch") is TorchAttentionBackend
