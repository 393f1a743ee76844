"""scripts/ab_bench.py: interleaved A/B of a `tesela bench` command across source trees."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("ab_bench", ROOT / "scripts" / "ab_bench.py")
ab_bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(ab_bench)


def test_the_trees_order_reverses_every_other_round():
    """A drift of the machine during the call weighs on each tree alike (A B, B A, A B)."""
    order = ab_bench.schedule(["new", "old"], 3)
    assert order == [(0, "new"), (0, "old"), (1, "old"), (1, "new"), (2, "new"), (2, "old")]


def test_untimed_warm_up_rounds_come_first_and_keep_the_alternation():
    """A first process runs slow on a fresh GPU host: every tree gets its untimed runs before
    any timed one, and the timed rounds still start with the first tree."""
    order = ab_bench.schedule(["new", "old"], 2, warmup=1)
    assert order == [(-1, "old"), (-1, "new"), (0, "new"), (0, "old"), (1, "old"), (1, "new")]
    assert ab_bench.schedule(["a", "b"], 1, warmup=2)[:4] == [
        (-2, "a"), (-2, "b"), (-1, "b"), (-1, "a")
    ]  # fmt: skip


def test_the_table_gives_each_trees_median_spread_and_ratio():
    runs = {
        "new": [{"/latency_ms/full/b1": v, "/rows/0/batch": 1.0} for v in (1.0, 3.0, 2.0)],
        "old": [{"/latency_ms/full/b1": v, "/rows/0/batch": 1.0} for v in (4.0, 5.0, 6.0)],
    }
    lines = ab_bench.summarize(runs, ab_bench.DEFAULT_METRIC)
    assert lines[0] == "| metric | new median [min-max] | old median [min-max] | old/new |"
    assert lines[2:] == ["| /latency_ms/full/b1 | 2 [1-3] | 5 [4-6] | 2.500 |"]  # no /batch


def test_numeric_leaves_skip_booleans_and_text():
    leaves = ab_bench.numeric_leaves({"a": [1, {"b": 2.5}], "c": True, "d": "x", "e": None})
    assert leaves == {"/a/0": 1.0, "/a/1/b": 2.5}


@pytest.mark.parametrize(
    "argv",
    [
        ["--tree", "a=.", "--", "bench", "decode"],  # one tree
        ["--tree", "a=.", "--tree", "a=.", "--", "bench", "decode"],  # same name
        ["--tree", "a=.", "--tree", "b=/nonexistent", "--", "bench", "decode"],
        ["--tree", "a=.", "--tree", "b=.", "--", "serve"],  # not a bench command
        ["--tree", "a=.", "--tree", "b=.", "--", "bench", "decode", "--output-dir", "x"],
        ["--tree", "a=.", "--tree", "b=."],  # no command
        ["--tree", "a=.", "--tree", "b=.", "--warmup", "-1", "--", "bench", "decode"],
    ],
)
def test_bad_arguments_say_what_to_give(argv, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as error:
        ab_bench.parse_args(argv)
    assert isinstance(error.value.code, str) and error.value.code


def test_each_tree_runs_its_own_code(tmp_path):
    """A real A/B of `bench decode` on the tiny model: each run imports its own tree (the copy
    writes a marker into its JSON), whatever tesela is installed."""
    other = tmp_path / "other"
    shutil.copytree(ROOT / "tesela", other / "tesela", ignore=shutil.ignore_patterns("__pycache__"))
    decode = other / "tesela" / "bench" / "decode.py"
    source = decode.read_text()
    anchor = '        "rows": [],\n'
    assert anchor in source
    decode.write_text(source.replace(anchor, anchor + '        "ab_marker": 7,\n', 1))
    command = ["bench", "decode", "--model", "tiny", "--batch-sizes", "1", "--contexts", "16",
               "--repeat", "3"]  # fmt: skip
    mine = ab_bench.run_once(command, str(ROOT), tmp_path / "a", timeout=300)
    theirs = ab_bench.run_once(command, str(other), tmp_path / "b", timeout=300)
    assert "/ab_marker" not in mine and theirs["/ab_marker"] == 7.0
    assert mine["/latency_ms/eager/b1-c16"] > 0 and theirs["/latency_ms/eager/b1-c16"] > 0


def test_warm_up_runs_run_but_stay_out_of_the_table(monkeypatch, capsys):
    """Each run's result is what `run_once` returns; the warm-ups' (made to stand out here) must
    not reach the medians."""
    calls = []

    def run_once(command, tree, output_dir, timeout):
        calls.append(output_dir.name)
        return {"/latency_ms/x": 100.0 if output_dir.name.endswith("--1") else 1.0}

    monkeypatch.setattr(ab_bench, "run_once", run_once)
    monkeypatch.chdir(ROOT)
    argv = ["--tree", "a=.", "--tree", "b=.", "--rounds", "2", "--", "bench", "decode"]
    assert ab_bench.main(argv) == 0
    assert calls == ["b--1", "a--1", "a-0", "b-0", "b-1", "a-1"]
    assert "| /latency_ms/x | 1 [1-1] | 1 [1-1] | 1.000 |" in capsys.readouterr().out
