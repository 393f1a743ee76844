"""Programmatic dependent launch (tesela/core/pdl.py): the contract is kept by construction.

A kernel launched with PDL starts before the previous grid has finished, so one that writes, or
reads what a kernel of the step writes, before `griddepcontrol.wait` races; a kernel compiled
to wait but launched without PDL merely gains nothing. These tests read the kernels' source
(every launched Triton kernel ends its parameters with `PDL` and, before its wait, loads only
weights, constant tables and the batch's rows; every launch site passes PDL and launch_pdl
together) and check the switch itself. The GPU tests run every kernel with PDL on an H100/H200.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from tesela.core import pdl

PACKAGE = Path(__file__).resolve().parents[1] / "tesela"


def _jit_functions() -> dict[str, tuple[Path, ast.FunctionDef]]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                "triton.jit" in ast.unparse(d) for d in node.decorator_list
            ):
                found[node.name] = (path, node)
    return found


def _called_names(node: ast.AST) -> set[str]:
    return {
        call.func.id
        for call in ast.walk(node)
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
    }


def _kernels() -> dict[str, tuple[Path, ast.FunctionDef]]:
    """The @triton.jit functions that are launched (not helpers called from another one)."""
    functions = _jit_functions()
    helpers = set().union(*(_called_names(node) for _, node in functions.values()))
    return {name: found for name, found in functions.items() if name not in helpers}


def test_the_scan_finds_the_kernels_of_every_layer():
    names = set(_kernels())
    for expected in (
        "gemv_kernel",
        "qk_norm_rope_kernel",
        "_decode_stage1_kernel",
        "_store_kv_kernel",
        "_extend_kernel",
        "router_gemm_topk_kernel",
        "down_sum_gemv_kernel",
        "lora_gather",
        "lora_small_gemm",
    ):
        assert expected in names
    assert "_route_token" not in names and "grid_dependency_sync" not in names  # helpers


def _before_the_wait(node: ast.FunctionDef) -> list[ast.stmt] | None:
    """The statements a kernel runs before `grid_dependency_sync(PDL)` (None: no such call)."""
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    for index, statement in enumerate(body):
        if ast.unparse(statement) == "grid_dependency_sync(PDL)":
            return body[:index]
    return None


def _calls(statements: list[ast.stmt], functions, seen=()) -> list[tuple[str, str]]:
    """(callee, first argument) of every call the statements make, the @triton.jit helpers
    they call followed into."""
    found = []
    for statement in statements:
        for call in ast.walk(statement):
            if not isinstance(call, ast.Call):
                continue
            callee = ast.unparse(call.func)
            first = ast.unparse(call.args[0]) if call.args else ""
            found.append((callee, first))
            if callee in functions and callee not in seen:
                helper = functions[callee][1]
                found += _calls(helper.body, functions, (*seen, callee))
    return found


@pytest.mark.parametrize("name", sorted(_kernels()))
def test_every_kernel_takes_pdl_last_and_waits_before_reading_activations(name):
    """Before the wait a kernel may compute indices and load weights and constant tables
    (which no kernel writes) and the batch's rows written before the forward
    (`pdl.PRE_WAIT_POINTERS`): nothing else, no store, no atomic, no load of another tensor,
    in the kernel or in a helper it calls there."""
    path, node = _kernels()[name]
    params = node.args.args
    assert params[-1].arg == "PDL" and "constexpr" in ast.unparse(params[-1].annotation), (
        f"{path.name}:{name}: a launched Triton kernel takes `PDL: tl.constexpr` last"
    )
    before = _before_the_wait(node)
    assert before is not None, f"{path.name}:{name} never calls grid_dependency_sync(PDL)"
    for callee, first in _calls(before, _jit_functions()):
        leaf = callee.rsplit(".", 1)[-1]  # tl.load(...).to: a cast of a load (seen on its own)
        assert "store" not in leaf and "atomic" not in leaf, (
            f"{path.name}:{name}: {callee}({first}, ...) runs before the wait"
        )
        if leaf != "load":
            continue
        assert first.startswith(pdl.PRE_WAIT_POINTERS), (
            f"{path.name}:{name}: only weights, constant tables and the batch's rows load "
            f"before the wait, not {first}"
        )


def _grid_launches() -> list[tuple[Path, ast.Call]]:
    """Every `kernel[grid](..., CONSTEXPR=...)` call in the package (a launch passes keywords;
    indexing a list of callables does not)."""
    launches = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Subscript)
                and node.keywords
            ):
                launches.append((path, node))
    return launches


def test_every_grid_launch_sets_pdl_and_launch_pdl_together():
    launches = _grid_launches()
    assert len(launches) >= 12  # gemv, 4 fused, 3 LoRA, 2 router, 3 MoE, launcher
    for path, call in launches:
        if path.name == "launcher.py":  # CachedLauncher: tested below
            continue
        spread = [ast.unparse(k.value) for k in call.keywords if k.arg is None]
        assert any(s.startswith("launch_kwargs(") and s.count(",") == 1 for s in spread), (
            f"{path.name}:{call.lineno}: a kernel launch passes **launch_kwargs(device, tokens)"
        )
        named = {k.arg for k in call.keywords}
        assert not named & {"PDL", "launch_pdl"}, f"{path.name}:{call.lineno}: set apart"


def test_launch_keywords_pair_the_constexpr_with_the_launch_flag(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(pdl, "_device_status", lambda index: (True, "on: compute capability 9.0"))
    assert pdl.launch_kwargs(cuda, 1) == {"PDL": True, "launch_pdl": True}
    assert pdl.enabled_on(0, pdl.MAX_TOKENS)
    with pdl.forced(False):
        assert pdl.launch_kwargs(cuda, 1) == {"PDL": False}
        assert not pdl.enabled_on(0, 1)
        assert pdl.status(cuda) == (False, "off: forced off")
    assert pdl.launch_kwargs(torch.device("cpu"), 1) == {"PDL": False}


def test_launches_over_more_tokens_than_max_tokens_never_use_pdl(monkeypatch):
    """Measured: large prefills ran slower with PDL (module docstring of tesela/core/pdl.py)."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(pdl, "_device_status", lambda index: (True, "on: compute capability 9.0"))
    assert pdl.launch_kwargs(cuda, pdl.MAX_TOKENS) == {"PDL": True, "launch_pdl": True}
    assert pdl.launch_kwargs(cuda, pdl.MAX_TOKENS + 1) == {"PDL": False}
    assert not pdl.enabled_on(0, pdl.MAX_TOKENS + 1)


def test_the_fused_all_reduce_uses_pdl_only_up_to_the_rows_it_was_measured_at(monkeypatch):
    """The bound is 64 tokens; the fused all-reduce kernel keeps PDL to 16 rows (its two-card
    tests ran there), though it serves up to 32."""
    from tesela.distributed import fused_all_reduce as far

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(pdl, "_device_status", lambda index: (True, "on: compute capability 9.0"))
    assert far.PDL_ROWS < far.MAX_ROWS <= pdl.MAX_TOKENS
    assert pdl.launch_kwargs(cuda, far._pdl_tokens(far.PDL_ROWS))["PDL"]
    assert pdl.launch_kwargs(cuda, far._pdl_tokens(far.PDL_ROWS + 1)) == {"PDL": False}
    assert pdl.launch_kwargs(cuda, far.PDL_ROWS + 1)["PDL"]  # other kernels: up to MAX_TOKENS


def test_forced_scopes_refuse_nesting_and_restore():
    with pdl.forced(False), pytest.raises(RuntimeError, match="do not nest"), pdl.forced(True):
        pass
    assert pdl._forced is None


def test_cached_launchers_own_the_pdl_argument():
    from tesela.attention.triton_kernels.decode_attention import STAGE1, STAGE2
    from tesela.attention.triton_kernels.extend_attention import EXTEND
    from tesela.attention.triton_kernels.store_kv import STORE_KV

    for launcher in (STAGE1, STAGE2, EXTEND, STORE_KV):
        assert launcher.takes_pdl, launcher.name
        # the caller's groups cover every parameter but PDL, which the launcher appends
        assert len(launcher.constexpr) == len(launcher.kernel.arg_names) - 1


def test_off_on_cpu_and_under_the_interpreter():
    assert pdl.status(torch.device("cpu")) == (False, "off: cpu device")


def test_doctor_says_whether_kernels_launch_with_pdl_and_why():
    from tesela.doctor import doctor_report

    assert "programmatic dependent launch (PDL): off: cpu device" in doctor_report("cpu")
