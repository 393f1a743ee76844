"""scripts/profile_decode_step.py: what each kernel adds to a decode step under PDL."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "profile_decode_step.py"
SPEC = importlib.util.spec_from_file_location("profile_decode_step", SCRIPT)
profile_decode_step = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(profile_decode_step)


def test_a_kernel_launched_early_adds_only_what_runs_past_the_one_before():
    """Under PDL a kernel starts before the previous one ends and waits: its own duration
    counts the wait, its advance only the time past the previous end. One that ends inside a
    longer one adds nothing; the step's advances sum to its span less the first kernel."""
    spans = [
        ("gemv", 0.0, 10.0),
        ("rope", 8.0, 12.0),  # launched early: 4 us own, 2 us past the GEMV
        ("attn", 9.0, 11.0),  # ends inside rope's span: adds nothing
        ("gemv", 11.5, 20.0),  # weights streamed early, ends 8 us after rope
    ]
    calls, advance, own = profile_decode_step.advance_by_kernel(spans)
    assert calls == {"gemv": 2, "rope": 1, "attn": 1}
    assert advance == {"rope": 2.0, "attn": 0.0, "gemv": 8.0}
    assert own == {"gemv": 18.5, "rope": 4.0, "attn": 2.0}
    assert sum(advance.values()) == 20.0 - 10.0


def test_the_script_profiles_the_tiny_model_on_cpu():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "tiny", "--device", "cpu", "--context", "16",
         "--steps", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| kernel |"))
    assert "tiny, batch 1, context 16 on cpu" in lines[header - 1]
    rows = [line.split(" | ") for line in lines[header + 2 :] if line.startswith("| ")]
    assert rows and all(len(row) == 5 for row in rows)
