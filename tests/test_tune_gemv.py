"""The GEMV tuner's cases (tesela/tune/gemv.py) are the shapes a decode step really multiplies,
at every tensor-parallel size: the table is keyed by (N, K), so a case that misses a shard shape
leaves that layer untuned (it silently runs the unfused path) on the ranks that use it."""

import pytest
import torch

from tesela.config import ModelConfig
from tesela.distributed.group import TPGroup
from tesela.models.registry import model_class
from tesela.presets import PRESETS
from tesela.tune.gemv import keeps_triton, tuned_cases


def rank_linear_shapes(preset: str, size: int) -> set[tuple[int, int]]:
    """(N, K) of every matmul weight of rank 0's layer 0 and LM head, built on the meta device."""
    config = ModelConfig.from_hf_dict(PRESETS[preset])
    with torch.device("meta"):
        model = model_class(config)(config, TPGroup(0, size, "unused"))
    layer = model.model.layers[0]
    weights = [layer.self_attn.qkv_proj.weight, layer.self_attn.o_proj.weight]
    weights.append(model.lm_head.weight)
    if config.moe is not None:
        weights.append(layer.mlp.gate.weight)  # the router; the experts are not GEMVs
    else:
        weights += [layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight]
    return {tuple(w.shape) for w in weights}


@pytest.mark.parametrize(
    ("preset", "size"),
    [
        ("tiny", 1),
        ("tiny", 4),
        ("llama-3-8b", 2),
        ("qwen3-0.6b", 2),
        ("llama-3.2-1b", 16),
        ("qwen3-30b-a3b", 1),
        ("mixtral-8x7b", 2),
    ],
)
def test_cases_are_the_shard_shapes_of_rank_0(preset, size):
    """tiny at 4 replicates its 2 KV heads and pads its 258-word vocabulary; llama-3.2-1b at 16
    replicates 8 KV heads twice; the MoE presets (every layer sparse) add their router GEMM
    and have no dense MLP shape."""
    cases = tuned_cases(preset, size)
    assert {(n, k) for prologue, n, k in cases if prologue == "none"} == rank_linear_shapes(
        preset, size
    )
    # silu rides on down_proj (whole or this rank's columns), norm on qkv; norm on gate_up
    # only at TP 1 (under TP the post-attention norm runs with the all-reduce).
    dense = ModelConfig.from_hf_dict(PRESETS[preset]).moe is None
    prologues = {(p, n) for p, n, _ in cases if p != "none"}
    q_rows = cases[0][1]  # the first case is the plain qkv GEMM
    assert ("norm", q_rows) in prologues
    assert any(p == "silu" for p, _ in prologues) == dense
    assert any(p == "norm" and n != q_rows for p, n in prologues) == (dense and size == 1)


def test_a_size_that_cannot_split_is_refused():
    with pytest.raises(ValueError, match="does not divide"):
        tuned_cases("qwen3-0.6b", 3)


def test_a_fused_prologue_is_kept_unless_it_loses_by_the_margin():
    # H200, qwen3-30b-a3b norm + qkv at M=1: Triton 9.63 us, separate norm + cuBLAS 9.52 us.
    assert keeps_triton("norm", 9.63, 9.52, 0.03)
    assert not keeps_triton("norm", 9.90, 9.52, 0.03)
    assert keeps_triton("silu", 5.0, 5.0, 0.03)
    # A plain GEMV replaces cuBLAS only when it wins by the margin.
    assert not keeps_triton("none", 8.77, 8.98, 0.03)
    assert keeps_triton("none", 8.40, 8.98, 0.03)


def test_an_unknown_prologue_is_refused_before_any_timing(capsys):
    from tesela.tune.gemv import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--prologues", "silu,gelu"])
    assert exit_info.value.code == 2
    assert "unknown ['gelu']" in capsys.readouterr().err


@pytest.mark.parametrize("buckets", ["3", "1,x", ""])
def test_a_bucket_that_is_not_one_of_the_tables_is_refused_before_any_timing(capsys, buckets):
    from tesela.tune.gemv import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--buckets", buckets])
    assert exit_info.value.code == 2
    assert "--buckets" in capsys.readouterr().err


def test_a_prologue_tuned_alone_is_timed_against_the_tables_plain_kernel():
    """`--prologues norm` tunes no plain shape: the norm's unfused baseline is the separate
    norm plus the GEMM the model would run, the table's plain Triton entry where it has one."""
    import json

    from tesela.layers.gemv import TABLE_PATH
    from tesela.tune.gemv import table_plain_choices

    entries = json.loads(TABLE_PATH.read_text())["NVIDIA H200"]["bfloat16"]
    choices = table_plain_choices(entries)
    assert choices[(4096, 1024, 1)] == entries["none"]["4096,1024"]["1"]
    assert all(isinstance(n, int) and isinstance(b, int) for n, _, b in choices)
    assert (14336, 4096, 1) not in choices  # cuBLAS won there: no entry, no plain choice


def test_one_and_two_token_buckets_also_try_the_whole_k_in_one_tile():
    """One tile over all of K is loaded before the PDL wait (the whole weight slice streams while
    the previous kernel finishes); the tuner times it at 1-2 tokens, within the register budget."""
    from tesela.tune.gemv import candidates

    def whole_k(bucket, k):
        return {(c["block_n"], c["block_k"]) for c in candidates(bucket, k) if c["block_k"] >= k}

    assert whole_k(1, 3072) == {(2, 4096), (4, 4096)}  # qwen3-0.6b down_proj
    assert whole_k(2, 2048) == {(2, 2048), (4, 2048)}
    assert whole_k(1, 8192) == {(2, 8192)}
    assert whole_k(4, 3072) == set()  # tensor cores from 4 tokens: tiles of 128-256
    assert whole_k(1, 16384) == set()  # past the register budget
    assert whole_k(1, 1024) == {(4, 1024), (8, 1024)}  # the usual tiles already cover K


def test_a_run_of_some_buckets_keeps_the_shapes_other_entries():
    from tesela.tune.gemv import merged_entries

    old = {"1": {"block_k": 1024}, "2": {"block_k": 512}, "8": {"block_k": 256}}
    # bucket 1 re-timed and won with a new tile; bucket 2 re-timed and lost to cuBLAS
    got = merged_entries(old, {"1": {"block_k": 4096}}, (1, 2))
    assert got == {"1": {"block_k": 4096}, "8": {"block_k": 256}}


@pytest.mark.parametrize("k", [1024, 2048, 3072, 8192])
def test_split_candidates_split_k_into_whole_tiles_and_only_for_plain_gemms(k):
    """The split kernel refuses a K it cannot split into whole tiles, and has no prologue: the
    tuner offers it only what it serves."""
    from tesela.tune.gemv import candidates

    plain = [c for c in candidates(1, k) if "split_k" in c]
    assert plain and all(k % (c["split_k"] * c["block_k"]) == 0 for c in plain)
    assert {c["split_k"] for c in plain} >= {1, 2, 4}
    for prologue in ("norm", "silu"):
        assert not any("split_k" in c for c in candidates(1, k, prologue))
