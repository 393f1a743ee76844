"""`tesela bench lora` on `tiny` on CPU: both engines measured, graph memory per graph set, and a
prefill batch shaped to fit a FULL mixed graph (the path that serves prefill on a GPU)."""

from __future__ import annotations

import argparse
import json

from tesela.bench.lora import add_lora_arguments, bench_batch, build_runner
from tesela.cli import main
from tesela.core.forward_batch import ForwardMode

ARGV = ["--model", "tiny", "--device", "cpu", "--batch-sizes", "1,2", "--prefill-tokens", "64"]
ARGV += ["--context", "8", "--num-adapters", "2", "--rank", "4", "--repeat", "2"]


def test_bench_lora_runs_on_cpu(tmp_path, capsys):
    assert main(["bench", "lora", *ARGV, "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "lora-tiny.json").read_text())
    assert results["full_mixed"] == "on"
    for engine in ("base", "lora"):
        cells = results[engine]
        for phase in ("decode", "prefill"):
            for b in (1, 2):
                key = f"{phase}/b{b}"
                assert cells[f"{key}/eager"] > 0 and cells[f"{key}/graphs"] > 0
                assert cells[f"{key}/pipelined"] > 0
                assert cells[f"{key}/max_abs_err"] < 1e-4  # graphs equal eager
        assert "piecewise breakable" in cells["graph_memory_by_set"]
    assert results["lora"]["lora_memory_bytes"] > 0
    # tiny's 4 targets per layer on CPU (no fused GEMM there): gather's one launch each at
    # decode, sgmv's shrink + expand at prefill
    launches = {"decode/b1": 4, "decode/b2": 4, "prefill/b1": 8, "prefill/b2": 8}
    assert results["lora_launches_per_layer"] == launches
    out = capsys.readouterr().out
    assert "graph memory: base" in out and "piecewise breakable: base" in out
    assert "decode b1 4, b2 4; prefill b1 8, b2 8" in out
    assert "lora/base (pipelined)" in out


def test_pipelined_timing_runs_every_step_without_waiting_between():
    """`pipelined_ms`: the warmup, then `rounds` rounds of `steps` calls, and a per-call time."""
    import torch

    from tesela.bench.common import pipelined_ms

    calls = []
    ms = pipelined_ms(calls.append, "step", torch.device("cpu"), steps=4, rounds=3)
    assert len(calls) == 3 + 4 * 3 and ms >= 0


def test_a_prefill_row_fits_a_full_mixed_graph():
    """A prefill longer than the decode context still fits the graphs' rows (what
    FullMixedRunner.can_run checks: tokens, rows, block-table width), so on a GPU it runs
    FULL mixed as in production, not piecewise for want of a block-table column."""
    parser = argparse.ArgumentParser()
    add_lora_arguments(parser)
    args = parser.parse_args(ARGV)
    runner = build_runner(args, [1, 2], lora=True)
    config = runner.config
    max_blocks = -(-config.scheduler.max_model_len // config.cache.block_size)
    for b in (1, 2):
        rows = [(0, args.prefill_tokens // b)] * b
        batch = bench_batch(runner, rows, [1 + r % 2 for r in range(b)], ForwardMode.EXTEND)
        assert batch.num_tokens <= max(config.graph.capture_sizes)
        assert batch.batch_size <= config.scheduler.max_num_seqs
        assert batch.block_tables.shape[1] <= max_blocks
