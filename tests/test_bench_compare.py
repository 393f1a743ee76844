"""`tesela bench compare` on CPU: another checkout imported beside this one under its own name
(its modules, custom ops and classes its own), both sides timed in one process."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import uuid
from pathlib import Path

import pytest
import torch

import tesela
from tesela.bench.compare import import_checkout, parse_baseline
from tesela.cli import main

PACKAGE_DIR = Path(tesela.__file__).parent


def checkout_copy(root: Path, edit=None) -> Path:
    """A checkout root holding a copy of this tesela package (optionally edited)."""
    shutil.copytree(PACKAGE_DIR, root / "tesela", ignore=shutil.ignore_patterns("__pycache__"))
    if edit is not None:
        edit(root / "tesela")
    return root


def unique(prefix: str) -> str:
    """A baseline name not imported yet in this process (a package is imported once)."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def test_a_baseline_imports_beside_tesela_with_its_own_modules_and_ops(tmp_path):
    marker = "# edited in the baseline copy"

    def edit(package: Path) -> None:
        path = package / "bench" / "compare.py"
        path.write_text(path.read_text() + f"\nMARKER = {marker!r}\n")

    root = checkout_copy(tmp_path / "old", edit)
    name = unique("old")
    module = import_checkout(root, name, tmp_path / "imports")
    assert module.__name__ == f"tesela_{name}" and sys.modules["tesela"] is tesela
    baseline_compare = importlib.import_module(f"tesela_{name}.bench.compare")
    assert getattr(baseline_compare, "MARKER", None) == marker  # the baseline's own code
    runner_module = importlib.import_module(f"tesela_{name}.executor.model_runner")
    from tesela.executor.model_runner import ModelRunner

    assert runner_module.ModelRunner is not ModelRunner
    # The baseline's modules import the baseline's, not this checkout's.
    assert runner_module.FullDecodeRunner.__module__ == f"tesela_{name}.executor.full_decode"
    # Its custom ops live in their own namespace (a missing op raises), beside this one's.
    assert getattr(torch.ops, f"tesela_{name}").attention is not torch.ops.tesela.attention
    with pytest.raises(ValueError, match="imported in this process already"):
        import_checkout(root, name, tmp_path / "again")


def test_compare_times_every_side_in_one_process(tmp_path):
    name = unique("base")
    root = checkout_copy(tmp_path / name)
    out = tmp_path / "results"
    argv = ["bench", "compare", "--model", "tiny", "--device", "cpu", "--baseline", str(root)]
    argv += ["--batch-sizes", "1,2", "--contexts", "8", "--rounds", "2", "--repeat", "2"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    results = json.loads((out / "compare-tiny.json").read_text())
    assert results["sides"] == ["current", name] and results["reference"] == name
    rows = {(r["side"], r["batch"]): r for r in results["rows"]}
    assert set(rows) == {(side, b) for side in ("current", name) for b in (1, 2)}
    for b in (1, 2):
        assert rows[name, b]["ratio"] == 1.0 and rows["current", b]["step_ms"] > 0
        # The same code and the same seeded random weights: the same greedy tokens.
        assert rows["current", b]["tokens"] == rows[name, b]["tokens"]
        assert len(rows["current", b]["tokens"]) == b


def test_bad_baselines_say_what_to_pass(tmp_path, capsys):
    with pytest.raises(ValueError, match="has no tesela/ package"):
        import_checkout(tmp_path, unique("empty"), tmp_path / "imports")
    with pytest.raises(ValueError, match="letters, digits and _"):
        import_checkout(PACKAGE_DIR.parent, "a-b", tmp_path / "imports")
    assert parse_baseline("old=/tmp/x") == ("old", Path("/tmp/x"))
    assert parse_baseline("/tmp/my-tree")[0] == "my_tree"
    argv = ["bench", "compare", "--model", "tiny", "--device", "cpu", "--baseline", "current=."]
    assert main(argv) != 0
    assert "sides need distinct names" in capsys.readouterr().err


def test_end_to_end_compare_times_each_sides_own_engine(tmp_path):
    """`--end-to-end`: every side's `LLM.generate` on the same prompts, interleaved in one
    process. A baseline whose engine step sleeps 20 ms comes out at 20 ms a step or more, so
    each side runs its own engine and the figure is wall time through it."""

    def slow_steps(package: Path) -> None:
        path = package / "engine" / "llm_engine.py"
        path.write_text(
            path.read_text()
            + "\n\n_step = LLMEngine.step\n\n\n"
            + "def _slow_step(self, *args, **kwargs):\n"
            + "    __import__('time').sleep(0.02)\n"
            + "    return _step(self, *args, **kwargs)\n\n\n"
            + "LLMEngine.step = _slow_step\n"
        )

    name = unique("slow")
    root = checkout_copy(tmp_path / name, slow_steps)
    out = tmp_path / "results"
    argv = ["bench", "compare", "--end-to-end", "--model", "tiny", "--device", "cpu"]
    argv += ["--baseline", str(root), "--batch-sizes", "1,2", "--input-len", "8"]
    argv += ["--output-len", "4", "--rounds", "2", "--repeat", "1", "--output-dir", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "compare-tiny.json").read_text())
    assert results["end_to_end"] and results["sides"] == ["current", name]
    rows = {(r["side"], r["batch"]): r for r in results["rows"]}
    for b in (1, 2):
        assert rows["current", b]["path"] == rows[name, b]["path"] == "generate"
        assert rows["current", b]["context"] == 8  # the cell's prompt length
        # The same prompts, weights and greedy code: the same first tokens.
        assert rows["current", b]["tokens"] == rows[name, b]["tokens"]
        assert len(rows["current", b]["tokens"]) == 4
        # Every baseline step sleeps 20 ms: a floor no load on the machine can lower (the
        # current side's figure, loaded, has no such bound either way: not asserted).
        assert rows[name, b]["min_ms"] >= 20.0, rows
        assert rows[name, b]["ratio"] == 1.0
        ratio = rows["current", b]["step_ms"] / rows[name, b]["step_ms"]
        assert rows["current", b]["ratio"] == pytest.approx(ratio)
