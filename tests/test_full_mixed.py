"""FULL mixed graphs on CPU: the whole forward of extend and mixed batches, attention inside,
captured with the stand-in graph and replayed over persistent buffers.

Uses the real Triton backend in Triton's interpreter (CI exports TRITON_INTERPRET=1). The
stand-in graph re-runs the captured forward with the capture-time plan, so any launch value
(grid, tile count, row count) that depended on the capture batch instead of the persistent
buffers gives a wrong result here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (set by .ci/run)", allow_module_level=True)
pytest.importorskip("triton")

from test_dispatcher import batch  # noqa: E402  (rows on their own 16-token blocks)

from tesela.attention.policy import DeviceInfo, GraphSupport, resolve_attention  # noqa: E402
from tesela.core.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from tesela.core.kv_cache import DUMMY_SLOT  # noqa: E402
from tesela.engine.llm_engine import make_engine_config  # noqa: E402
from tesela.executor.dispatcher import RunPath  # noqa: E402
from tesela.executor.full_mixed import MixedGraphPlanner  # noqa: E402
from tesela.executor.model_runner import ModelRunner  # noqa: E402

BLOCK = 16
MAX_ROWS = 4
SIZES = (8, 32)


@pytest.fixture(scope="module")
def runner():
    from tesela.attention.triton_backend import TritonAttentionBackend, TritonAttentionConfig

    config, path = make_engine_config(
        "tiny", piecewise_cudagraph="breakable", capture_sizes=list(SIZES), num_kv_tokens=2048
    )
    config = dataclasses.replace(config, attention_backend="triton")
    runner = ModelRunner(config, path)
    assert isinstance(runner.attn_backend, TritonAttentionBackend)
    # 16-token query tiles, so a 32-token graph has several tiles per row and absent tiles.
    runner.attn_backend.config = TritonAttentionConfig(block_m=16, block_n=16)
    runner.add_full_mixed(SIZES, max_rows=MAX_ROWS, max_model_len=256)
    return runner


# Decode rows, a first prefill chunk and a later chunk whose prefix is already cached.
MIXED_ROWS = [(9, 1), (0, 7), (20, 6), (30, 1)]


def fill_prefixes(runner, rows, seed=1):
    """Run the prefixes eagerly, so that the rows' cached prefixes hold real K/V."""
    runner.forward_eager(batch([(0, p or 1) for p, _ in rows], seed=seed))


def test_mixed_batch_takes_the_full_mixed_path(runner):
    mixed = batch(MIXED_ROWS)
    assert mixed.mode is ForwardMode.MIXED
    assert runner.dispatcher.choose(mixed) == (RunPath.FULL_MIXED, None)
    assert runner.dispatcher.choose(batch([(0, 10)]))[0] is RunPath.FULL_MIXED
    assert runner.dispatcher.choose(batch([(0, 40)])) == (RunPath.EAGER, "too_many_tokens")


def test_replay_equals_eager_at_the_same_padded_shapes(runner):
    fill_prefixes(runner, MIXED_ROWS)
    full = runner.full_mixed
    # A bigger batch first leaves real rows, slots and tiles in every buffer.
    full.run(batch([(0, 9), (0, 12), (0, 5), (0, 3)], seed=5))
    got = full.run(batch(MIXED_ROWS, seed=2)).clone()
    expected = full.run_eager_padded(batch(MIXED_ROWS, seed=2))
    assert torch.equal(got, expected)
    # Against the unpadded eager forward: equal up to the GEMMs' choice of kernel by row count.
    reference = runner.forward_eager(batch(MIXED_ROWS, seed=2))
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_identical_across_full_mixed_piecewise_and_eager(runner):
    fill_prefixes(runner, MIXED_ROWS, seed=3)
    step = batch(MIXED_ROWS, seed=4)
    logits = {}
    for path in (RunPath.FULL_MIXED, RunPath.PIECEWISE, RunPath.EAGER):
        hidden = runner.dispatcher.runner(path).run(batch(MIXED_ROWS, seed=4))
        logits[path] = runner.compute_logits(hidden[step.logits_indices])
    tokens = {path: value.argmax(-1).tolist() for path, value in logits.items()}
    assert tokens[RunPath.FULL_MIXED] == tokens[RunPath.EAGER] == tokens[RunPath.PIECEWISE]
    torch.testing.assert_close(logits[RunPath.FULL_MIXED], logits[RunPath.EAGER])


def test_padding_is_zero_length_work(runner):
    full = runner.full_mixed
    big = batch([(0, 9), (0, 12), (0, 5), (0, 3)], seed=6)
    full.run(big)
    pool = runner.kv_cache
    before = [k.clone() for k in pool.k_buffers]
    small = batch([(0, 5), (9, 1)], seed=7)  # 6 tokens: padded to 8
    full.run(small)
    untouched = [s for s in big.out_cache_loc.tolist() if s not in small.out_cache_loc.tolist()]
    for k, b in zip(pool.k_buffers, before, strict=True):
        assert torch.equal(k[untouched], b[untouched])  # padding never reached the cache
    assert full.buffers.out_cache_loc[6:8].tolist() == [DUMMY_SLOT] * 2
    assert full.buffers.input_ids[6:8].tolist() == [0, 0] and full.buffers.positions[
        6:8
    ].tolist() == [0, 0]
    state = runner.attn_backend.mixed_state
    rows = state.max_rows
    assert state.segment(0)[:2].tolist() == [5, 10]  # sequence lengths
    # 8 tokens in at most 4 rows: 4 entries, one real (row 1, whose query is token 5) ...
    assert state.segment(3)[:4].tolist() == [1, -1, -1, -1]
    assert state.segment(4)[0] == 5
    # ... and 8 // 16 + 4 tiles, one real (the decode row has none): (row 0, query 0).
    assert state.tiles(4).tolist() == [[0, 0], [-1, -1], [-1, -1], [-1, -1]]
    assert rows == MAX_ROWS


def test_prefill_only_batches_replay_the_graph_without_the_decode_launch(runner):
    full = runner.full_mixed
    assert sorted(full.captured) == [(s, split) for s in SIZES for split in (False, True)]
    prefill = batch([(0, 20), (0, 9)], seed=8)
    assert full.planner.key(prefill) == (32, False)
    got = full.run(prefill).clone()
    # Every row tiled for the extend kernel: longest causal walk first, 16-token query blocks.
    assert runner.attn_backend.mixed_state.tiles(3).tolist() == [[0, 16], [1, 0], [0, 0]]
    torch.testing.assert_close(got, runner.forward_eager(batch([(0, 20), (0, 9)], seed=8)))
    assert full.planner.key(batch([(0, 20), (9, 1)])) == (32, True)


def test_a_batch_with_more_rows_than_captured_is_refused(runner):
    rows = [(9, 1)] * (MAX_ROWS + 1) + [(0, 3)]
    wide = batch(rows)
    assert runner.full_mixed.can_run(wide) == "too_many_rows"
    assert runner.dispatcher.choose(wide)[0] is RunPath.PIECEWISE
    with pytest.raises(ValueError, match="FULL mixed graph buffers hold 4 rows"):
        runner.full_mixed.planner.plan(wide)


def test_capture_support_levels_gate_full_mixed_graphs(runner):
    from tesela.attention.torch_backend import TorchAttentionBackend

    assert runner.attn_backend.cuda_graph_support is GraphSupport.ALWAYS
    torch_backend = TorchAttentionBackend(runner.layout, runner.kv_cache)
    assert torch_backend.cuda_graph_support is GraphSupport.PIECEWISE
    with pytest.raises(ValueError, match="not ALWAYS"):
        MixedGraphPlanner(torch_backend, SIZES, MAX_ROWS, 16)
    settings = dict(dtype="bfloat16", head_dim=128, piecewise=True, full_decode=True)
    sm90 = DeviceInfo("cuda", (9, 0))
    triton = resolve_attention("triton", sm90, full_mixed=True, log=False, **settings)
    assert triton.full_mixed
    torch_ = resolve_attention("torch", sm90, full_mixed=True, log=False, **settings)
    assert not torch_.full_mixed
    assert any("FULL mixed graphs on -> off" in line for line in torch_.changes)


def test_sizes_past_the_row_limit_capture_over_several_rows():
    """max_model_len bounds the blocks per row in the graph's buffers: a capture size with more
    tokens than one row holds is captured over several rows, and sizes no batch can reach
    (more than max_rows full rows) are not captured at all."""
    from tesela.attention.triton_backend import TritonAttentionConfig

    config, path = make_engine_config("tiny", piecewise_cudagraph="none", num_kv_tokens=1024)
    runner = ModelRunner(dataclasses.replace(config, attention_backend="triton"), path)
    runner.attn_backend.config = TritonAttentionConfig(block_m=16, block_n=16)
    full = runner.add_full_mixed((8, 32, 64, 128), max_rows=4, max_model_len=16)
    assert full.sizes == (8, 32, 64)  # 4 rows of one 16-token block hold 64 tokens at most
    rows = [(0, 16), (0, 16), (3, 9)]  # 41 tokens: replays the 64-token graph
    fill_prefixes(runner, rows)  # row i's prefix in block 1 + 8i

    def short_rows() -> ForwardBatch:
        step = batch(rows, seed=7)
        return ForwardBatch.build(
            token_ids=[t.tolist() for t in step.input_ids.split([16, 16, 9])],
            prefix_lens=[0, 0, 3],
            block_tables=[[1], [9], [17]],  # one block per row, as the buffers allow
            block_size=BLOCK,
            device="cpu",
        )

    assert runner.dispatcher.choose(short_rows()) == (RunPath.FULL_MIXED, None)
    got = full.run(short_rows()).clone()
    assert torch.equal(got, full.run_eager_padded(short_rows()))
    torch.testing.assert_close(got, runner.forward_eager(short_rows()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_moe_layers_run_inside_full_mixed_graphs(checkpoints, kernels):
    """A Qwen3-MoE model's mixed batch through the FULL mixed graph: the replay equals the
    eager forward at the same padded shape, and greedy tokens match the piecewise and eager
    paths, with the torch experts and with the Triton MoE kernels (router, gate/up, down) run
    inside the graph; padding tokens reach no expert (their count is read on the device)."""
    from test_moe import MoeCalls

    from tesela.attention.triton_backend import TritonAttentionBackend, TritonAttentionConfig
    from tesela.layers.moe.layer import use_triton_on_cpu

    config, path = make_engine_config(
        str(checkpoints["qwen3_moe"][0]), piecewise_cudagraph="breakable",
        capture_sizes=list(SIZES), num_kv_tokens=2048,
    )  # fmt: skip
    moe_runner = ModelRunner(dataclasses.replace(config, attention_backend="triton"), path)
    assert isinstance(moe_runner.attn_backend, TritonAttentionBackend)
    moe_runner.attn_backend.config = TritonAttentionConfig(block_m=16, block_n=16)
    with use_triton_on_cpu() if kernels == "triton" else contextlib.nullcontext():
        moe_runner.add_full_mixed(SIZES, max_rows=MAX_ROWS, max_model_len=256)
        fill_prefixes(moe_runner, MIXED_ROWS, seed=5)
        step = batch(MIXED_ROWS, seed=6)
        assert moe_runner.dispatcher.choose(step) == (RunPath.FULL_MIXED, None)
        full = moe_runner.full_mixed
        full.run(batch([(0, 9), (0, 12), (0, 5), (0, 3)], seed=7))  # leaves other rows behind
        with MoeCalls() as observed:
            got = full.run(batch(MIXED_ROWS, seed=6)).clone()
        assert len(observed.calls) == 2  # the two sparse layers, replayed
        for count, out in observed.calls:  # 15 real tokens on the 32-token graph
            assert count == 15 and out.shape[0] == 32
            assert torch.equal(out[15:], torch.zeros_like(out[15:]))
        assert torch.equal(got, full.run_eager_padded(batch(MIXED_ROWS, seed=6)))
        tokens = {}
        for path_kind in (RunPath.FULL_MIXED, RunPath.PIECEWISE, RunPath.EAGER):
            hidden = moe_runner.dispatcher.runner(path_kind).run(batch(MIXED_ROWS, seed=6))
            tokens[path_kind] = moe_runner.compute_logits(hidden[step.logits_indices]).argmax(-1)
    assert tokens[RunPath.FULL_MIXED].tolist() == tokens[RunPath.EAGER].tolist()
    assert tokens[RunPath.PIECEWISE].tolist() == tokens[RunPath.EAGER].tolist()


def test_the_graph_derives_the_metadata_the_host_would(runner):
    """The graph's first op (`mixed_graph_prologue`) derives the metadata from the batch's
    int32 pack on the device; on random batches (decode rows, 1-token first chunks, chunks
    over cached prefixes, tables of any width) it equals a host reference: lengths and starts
    per row, decode entries in row order, the tile table in `tile_table`'s order, the block
    tables, and absent entries and padding tokens past the batch."""
    import random

    from tesela.attention.triton_kernels.extend_attention import tile_table

    full, backend = runner.full_mixed, runner.attn_backend
    state = backend.mixed_state
    rng = random.Random(11)
    # Equal causal walks in two rows (row 0's second tile, row 1's first): the higher row first.
    cases = [[(0, 20), (16, 5), (9, 1), (0, 1)]]
    for _ in range(16):
        rows, budget = [], SIZES[-1]
        for _ in range(rng.randint(1, MAX_ROWS)):
            new = min(budget, rng.choice([1, 1, rng.randint(1, 20)]))
            if new:
                rows.append((rng.choice([0, 16, rng.randint(1, 100)]), new))
                budget -= new
        cases.append(rows)
    for trial, rows in enumerate(cases):
        tables = [
            rng.sample(range(1, 120), -(-(p + n) // BLOCK) + rng.randint(0, 3)) for p, n in rows
        ]
        step = ForwardBatch.build(
            token_ids=[[3] * n for _, n in rows], prefix_lens=[p for p, _ in rows],
            block_tables=tables, block_size=BLOCK, device="cpu",
        )  # fmt: skip
        size, split_decode = full.planner.key(step)
        full.prepare(step)
        backend.mixed_graph_prologue(size, split_decode, full.buffers.rows)()

        n, tokens = len(rows), step.num_tokens
        lens = [len for _, len in rows]
        starts = [sum(lens[:i]) for i in range(n)]
        decode = [i for i in range(n) if split_decode and lens[i] == 1]
        tiled = [0 if i in decode else lens[i] for i in range(n)]
        block_m = backend._mixed_config(size).block_m
        expected_tiles = tile_table(tiled, [p for p, _ in rows], block_m)
        past = MAX_ROWS - n
        assert state.segment(0).tolist() == [p + e for p, e in rows] + [-1] * past, trial
        assert state.segment(1).tolist() == [p for p, _ in rows] + [-1] * past
        assert state.segment(2).tolist() == starts + [-1] * past
        metadata = full.planner.plan(step, split_decode).attn_metadata
        if split_decode:
            entries = metadata.decode_rows.shape[0]
            assert metadata.decode_rows.tolist() == decode + [-1] * (entries - len(decode))
            absent = [-1] * (entries - len(decode))
            assert metadata.decode_tokens.tolist() == [starts[i] for i in decode] + absent
        num_tiles = metadata.tiles.shape[0]
        got = metadata.tiles.reshape(-1).tolist()
        assert got == expected_tiles + [-1] * (2 * num_tiles - len(expected_tiles)), trial
        for i, table in enumerate(tables):
            assert state.block_tables[i, : len(table)].tolist() == table
        assert full.buffers.rows[:, tokens:size].tolist() == [[0] * (size - tokens)] * 3
        assert full.buffers.rows[:, :tokens].tolist() == step.token_rows.tolist()
