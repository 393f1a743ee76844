"""The benchmark package's shared pieces: `python -m tesela.bench` merges per-column prefill
JSONs into one (what scripts/gpu_check.sh runs), the host timer calls warmup then repeat times
with fresh inputs, and list flags fail with the flag's name."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tesela.bench.common import host_samples_ms, int_list
from tesela.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_merge_command_joins_per_column_prefill_runs(tmp_path, capsys):
    for column in ("eager", "breakable"):
        argv = ["bench", "prefill", "--model", "tiny", "--device", "cpu", "--columns", column]
        argv += ["--num-tokens", "8", "--mixed", "none", "--repeat", "1", "--warmup", "0"]
        assert main([*argv, "--output-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    parts = sorted(tmp_path.glob("prefill-tiny-*.json"))
    assert len(parts) == 2
    out = tmp_path / "merged" / "prefill-tiny.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tesela.bench", str(out), *map(str, parts)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    merged = json.loads(out.read_text())
    assert set(merged["latency_ms"]) == {"eager/8", "breakable/8"}
    assert merged["eager_in_every_run"] is True
    assert "| 8 |" in result.stdout and "eager" in result.stdout
    # host us of one breakable split call, a column of the table
    assert merged["split_us"]["breakable/8"] > 0 and "split us" in result.stdout


def test_host_timer_warms_up_then_times_fresh_inputs():
    calls, made = [], []

    def make():
        made.append(len(made))
        return made[-1]

    samples, last = host_samples_ms(calls.append, make, torch.device("cpu"), repeat=4, warmup=2)
    assert len(samples) == 4 and all(s >= 0 for s in samples)
    assert calls == [0, 0, 1, 2, 3, 4]  # warmup on the first input, then one fresh input per run
    assert last is None


def test_list_flags_name_the_flag():
    assert int_list("1, 8,32", "--batch-sizes") == [1, 8, 32]
    with pytest.raises(ValueError, match="--batch-sizes must be comma-separated integers"):
        int_list("1,x", "--batch-sizes")
    with pytest.raises(ValueError, match="--contexts needs positive integers"):
        int_list("0", "--contexts")
