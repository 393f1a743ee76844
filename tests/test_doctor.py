"""`tesela doctor`'s report on this (CPU) machine."""

from __future__ import annotations

import logging

import pytest
import torch

from tesela.doctor import doctor_report


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the report of a CPU-only machine")
def test_report_names_device_versions_and_decision(caplog):
    caplog.set_level(logging.INFO, logger="tesela.attention")
    report = doctor_report()
    assert "device (asked: auto)\n  cpu (" in report
    assert f"torch         {torch.__version__}" in report
    # The engine runs eagerly on CPU: the report must not claim piecewise graphs there.
    assert "decision: torch, piecewise graphs off, FULL decode graphs off" in report
    assert "piecewise graphs on" not in report.split("what the policy would do")[0]
    assert "- backend auto -> torch: auto picks torch, the reference backend, on CPU" in report
    assert caplog.records == []  # the report prints decisions; it does not log them


def test_report_lists_every_backend_with_its_support():
    report = doctor_report("cpu")
    assert "  torch       available\n    devices cpu,cuda;" in report
    for name in ("triton", "flashinfer"):
        assert f"  {name:<11} " in report
    assert "graphs FULL_DECODE; variants cutlass,fa2" in report
    # Capture support levels: torch plans on the host, triton runs any batch in a FULL graph.
    assert "graphs PIECEWISE; variants -" in report
    assert "graphs ALWAYS; variants plain,tma" in report
    if _installed("triton"):
        assert "triton      available; variant(s) tma declared, not implemented" in report
    # Declared in the table, never buildable here: shown as such, with what is missing.
    backends = report.split("attention backends (declared by the policy table)\n", 1)[1]
    flashinfer = backends.split("  flashinfer  ", 1)[1].splitlines()[0]
    assert flashinfer.startswith("declared, unavailable here:")
    assert "no tesela adapter yet (tesela.attention.flashinfer_backend)" in flashinfer
    if not _installed("flashinfer"):
        assert "package flashinfer not installed (pip install flashinfer-python)" in flashinfer


def test_report_explains_a_requested_backend_on_cpu():
    report = doctor_report("cpu", attention_backend="flashinfer", dtype="float32", head_dim=64)
    assert "settings: attention_backend=flashinfer, dtype=float32, head_dim=64" in report
    assert "- backend flashinfer -> torch: flashinfer attention does not run on cpu" in report


def test_report_illustrates_the_sm100_rule():
    report = doctor_report("cpu")
    on = report.split("SM100 flashinfer piecewise on ", 1)[1].splitlines()
    off = report.split("SM100 flashinfer piecewise off", 1)[1].splitlines()
    assert "-> flashinfer:fa2, piecewise graphs on" in on[0] and "TMA descriptor" in on[1]
    assert "-> flashinfer:cutlass, piecewise graphs off" in off[0]
    assert "SM90 flashinfer piecewise on " in report and "SM80 triton piecewise off" in report


def test_report_rejects_unknown_settings():
    with pytest.raises(ValueError, match="unknown attention backend 'vllm'"):
        doctor_report("cpu", attention_backend="vllm")
    with pytest.raises(ValueError, match="unknown device kind 'mps'"):
        doctor_report("mps")


def _installed(package: str) -> bool:
    from tesela.attention.policy import package_importable

    return package_importable(package)


def test_report_says_what_tensor_parallelism_would_pick_and_why():
    """Two CPU ranks: gloo for the plain all-reduce; the fused all-reduce + add + norm where
    the kernel runs (under the interpreter, as in this suite), else gloo and the norm."""
    from tesela.distributed.fused_all_reduce import kernel_interpreted

    section = doctor_report("cpu").split("tensor parallelism at size 2 (engine defaults)\n")[1]
    assert "  all-reduce: gloo (CPU ranks reduce over gloo)" in section
    fused = "fused (CPU ranks: the fused kernel under the Triton interpreter)"
    unfused = "unfused (CPU ranks reduce over gloo)"
    want = fused if kernel_interpreted() else unfused
    assert f"  decode batches' all-reduce + add + norm: {want}" in section


def test_report_says_where_lora_runs_the_fused_gemms():
    """From the checked-in table: H200's fused entries (qwen3-0.6b's qkv target in one launch
    at 1 to 64 tokens and as shrink + fused GEMM at 128 to 4096, llama-3.2-1b's down in one
    launch and, at 1024 only, the latter); a card without entries keeps the base GEMM + the LoRA kernels,
    and says so."""
    from tesela.attention.policy import DeviceInfo
    from tesela.doctor import _lora_section

    h200 = _lora_section(DeviceInfo("cuda", (9, 0), name="NVIDIA H200"))
    qkv = (
        "  K 1024, 3 slice(s) of up to 2048 rows: one launch at 1, 2, 4, 8, 16, 32, 64; "
        "shrink + fused GEMM at 128, 256, 512, 1024, 2048, 4096\n"
    )
    assert qkv in h200
    down = "  K 8192, 1 slice(s) of up to 2048 rows: one launch at 1, 2, 4, 8, 16, 32, 64; "
    assert down + "shrink + fused GEMM at 1024\n" in h200
    assert "everywhere else: the base GEMM, then gather (decode) or sgmv shrink + expand" in h200
    other = _lora_section(DeviceInfo("cuda", (8, 0), name="NVIDIA A100-SXM4-80GB"))
    assert "no fused entry for this card" in other
    assert "LoRA kernels: the torch path" in doctor_report("cpu")


def test_gemv_section_names_the_small_m_kernel_of_each_tuned_shape():
    """From the checked-in table: on H200 llama-3.2-1b's down_proj (2048 x 8192) runs the split
    kernel at every bucket and qwen3-0.6b's o_proj (1024 x 2048) streams at 1-2 tokens; a card
    without entries runs the unfused path and says how to tune it."""
    from tesela.attention.policy import DeviceInfo
    from tesela.doctor import _gemv_section

    h200 = _gemv_section(DeviceInfo("cuda", (9, 0), name="NVIDIA H200"))
    assert "  2048 x 8192: split-K 8 at 1, 4; split-K 4 at 2, 8, 16\n" in h200
    assert "  1024 x 2048: streaming at 1, 2; split-K 8 at 4, 8, 16\n" in h200
    assert "  3072 x 2048 with the norm prologue: streaming at 1, 2\n" in h200
    assert h200.endswith(
        "everywhere else: the separate norm or SiLU kernel, then the plain entry or cuBLAS"
    )
    other = _gemv_section(DeviceInfo("cuda", (8, 0), name="NVIDIA A100-SXM4-80GB"))
    assert "no entry for this card (python -m tesela.tune.gemv)" in other
    assert "small-M GEMMs: torch's linear on CPU" in doctor_report("cpu")
