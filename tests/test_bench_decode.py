"""`tesela bench decode` and `tesela bench latency` run on `tiny` on CPU; the decode floor
counts exactly the bytes a step reads."""

from __future__ import annotations

import json

import pytest

from tesela.bench.decode import decode_floor_bytes, kv_bytes_per_token
from tesela.cli import main
from tesela.engine.llm_engine import make_engine_config
from tesela.executor.model_runner import ModelRunner


def expected_floor(mc, itemsize: int, batch: int, context: int) -> int:
    """Counted from the config alone: every layer's weights, the final norm, the LM head, one
    embedding row per token, and K and V of every layer for every context token."""
    h, inter = mc.hidden_size, mc.intermediate_size
    q, kv = mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim
    per_layer = h * (q + 2 * kv) + q * h + h * 2 * inter + inter * h + 2 * h
    if mc.qk_norm:
        per_layer += 2 * mc.head_dim
    weights = mc.num_hidden_layers * per_layer + h + mc.vocab_size * h
    kv_read = batch * context * 2 * mc.num_hidden_layers * kv
    return (weights + batch * h + kv_read) * itemsize


@pytest.mark.parametrize("model", ["tiny", "qwen3-tiny"])
def test_decode_floor_counts_the_bytes_the_step_reads(model, tmp_path):
    if model == "qwen3-tiny":  # tied embeddings and q/k norm: the qwen3 rules at a tiny size
        from tesela.config import ModelConfig
        from tesela.presets import PRESETS

        shape = dict(PRESETS["tiny"], architectures=["Qwen3ForCausalLM"])
        shape.update(tie_word_embeddings=True, model_type="qwen3")
        (tmp_path / "config.json").write_text(json.dumps(shape))
        assert ModelConfig.from_pretrained(tmp_path).qk_norm
        model = str(tmp_path)
    config, path = make_engine_config(model, device="cpu", num_kv_tokens=256, load_format="dummy")
    runner = ModelRunner(config, path)
    mc = config.model_config
    for batch, context in [(1, 16), (3, 100)]:
        got = decode_floor_bytes(runner.model, batch, context, kv_bytes_per_token(config))
        assert got == expected_floor(mc, 4, batch, context)


def test_bench_decode_runs_on_cpu(tmp_path, capsys):
    argv = ["bench", "decode", "--model", "tiny", "--batch-sizes", "1,2", "--contexts", "8"]
    assert main([*argv, "--repeat", "2", "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "decode-tiny.json").read_text())
    assert [(r["batch"], r["context"]) for r in results["rows"]] == [(1, 8), (2, 8)]
    assert all(r["floor_bytes"] > 0 and r["eager_ms"] > 0 for r in results["rows"])
    assert "launches per layer n/a" in capsys.readouterr().out


def test_bench_latency_runs_on_cpu(tmp_path, capsys):
    argv = ["bench", "latency", "--model", "tiny", "--device", "cpu", "--batch-sizes", "1,3"]
    argv += ["--input-len", "8", "--output-len", "4", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    results = json.loads((tmp_path / "latency-tiny.json").read_text())
    assert [r["batch"] for r in results["rows"]] == [1, 3]
    assert all(r["output_tokens_per_s"] > 0 for r in results["rows"])
    assert "| 3 |" in capsys.readouterr().out


def test_bench_decode_at_tensor_parallel_size_2_on_cpu(tmp_path, capfd):
    """Two gloo ranks; CPU ranks fuse decode batches' all-reduce + add + norm (the kernel under
    the interpreter), and the table says so with both reductions' cost per layer."""
    argv = ["bench", "decode", "--model", "tiny", "--batch-sizes", "1", "--contexts", "8"]
    argv += ["--device", "cpu", "--repeat", "2", "--tensor-parallel-size", "2"]
    assert main([*argv, "--output-dir", str(tmp_path)]) == 0
    out = capfd.readouterr().out  # rank 0 prints from its own process
    assert "tensor parallel size 2" in out
    assert "all-reduce + add + norm: fused (CPU ranks" in out
    results = json.loads((tmp_path / "decode-tiny-tp2.json").read_text())
    assert results["rows"][0]["eager_ms"] > 0
    assert results["all_reduce_add_norm_us_per_layer"]["1"] > 0
