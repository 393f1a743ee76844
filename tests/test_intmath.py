"""Host integer helpers, and the rule that host code uses them rather than Triton's constexpr
functions (tesela/core/intmath.py says why: microseconds per call on every replay)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

from tesela.core.intmath import cdiv, next_power_of_2

PACKAGE = Path(__file__).resolve().parents[1] / "tesela"
CONSTEXPR_FUNCTIONS = {"cdiv", "next_power_of_2"}


def test_cdiv_and_next_power_of_2():
    for a in range(0, 70):
        for b in (1, 2, 3, 7, 16, 64):
            assert cdiv(a, b) == math.ceil(a / b)
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 4, 5, 96, 128, 129)] == [
        1, 1, 2, 4, 4, 8, 128, 128, 256,
    ]  # fmt: skip


def _is_jit(node: ast.AST) -> bool:
    return any("jit" in ast.unparse(d) for d in getattr(node, "decorator_list", ()))


def _host_calls_of_triton_constexpr(tree: ast.AST) -> list[int]:
    """Lines calling triton.cdiv / triton.next_power_of_2 outside @triton.jit functions."""
    found = []

    def visit(node: ast.AST, in_kernel: bool) -> None:
        in_kernel = in_kernel or _is_jit(node)
        if (
            not in_kernel
            and isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in CONSTEXPR_FUNCTIONS
            and ast.unparse(node.func.value) == "triton"
        ):
            found.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, in_kernel)

    visit(tree, False)
    return found


def test_host_code_calls_no_triton_constexpr_function():
    offenders = {
        str(path.relative_to(PACKAGE.parent)): lines
        for path in sorted(PACKAGE.rglob("*.py"))
        if (lines := _host_calls_of_triton_constexpr(ast.parse(path.read_text())))
    }
    assert offenders == {}, f"use tesela.core.intmath instead of triton's: {offenders}"


def test_the_walker_finds_a_host_call_and_skips_kernels():
    source = (
        "import triton\n"
        "def grid(n):\n    return triton.cdiv(n, 64)\n"
        "@triton.jit\ndef kernel(n):\n    x = triton.cdiv(n, 64)\n"
    )
    assert _host_calls_of_triton_constexpr(ast.parse(source)) == [3]
