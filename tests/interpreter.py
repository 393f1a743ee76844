"""Running a test module's Triton tests under Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, and torch._dynamo imports triton
when it is installed, so in a full run a module may find triton loaded without the interpreter.
Such a module's kernel tests skip in place and one test re-runs the module in a fresh process
with the variable set (`rerun_under_interpreter`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def triton_interpreted() -> bool:
    """Whether Triton kernels run in this process's interpreter (never on a CUDA machine)."""
    if torch.cuda.is_available():
        return False
    try:
        from tesela.attention.triton_kernels.extend_attention import kernels_interpreted
    except ImportError:
        return False
    return kernels_interpreted()


def rerun_under_interpreter(module: str, *pytest_args: str, no_skips: bool = False) -> None:
    """Run the test module at `module` in a fresh process with TRITON_INTERPRET=1 and assert
    that it passed (and, with `no_skips`, that nothing in it skipped)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", module, "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(
        [*command, *pytest_args], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
    if no_skips:
        assert "skipped" not in result.stdout, result.stdout[-2000:]
