"""The dispatcher's choice per batch kind, and FULL decode graphs captured and replayed on CPU.

Uses the real Triton backend in Triton's interpreter (CI exports TRITON_INTERPRET=1), since the
FULL decode runner needs a backend with persistent decode-graph buffers. The runner captures
every size with the CPU stand-in graph, so replays read the static buffers as on a GPU.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (set by .ci/run)", allow_module_level=True)
pytest.importorskip("triton")

from tesela.attention.base import StaleMetadataError  # noqa: E402
from tesela.core.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from tesela.core.kv_cache import DUMMY_SLOT  # noqa: E402
from tesela.engine.llm_engine import make_engine_config  # noqa: E402
from tesela.executor.dispatcher import RunPath  # noqa: E402
from tesela.executor.model_runner import ModelRunner  # noqa: E402

BLOCK = 16


@pytest.fixture(scope="module")
def runner():
    from tesela.attention.triton_backend import TritonAttentionBackend

    config, path = make_engine_config(
        "tiny", piecewise_cudagraph="breakable", capture_sizes=[4, 8, 16, 32], num_kv_tokens=2048
    )
    config = dataclasses.replace(config, attention_backend="triton")
    runner = ModelRunner(config, path)
    assert isinstance(runner.attn_backend, TritonAttentionBackend)
    runner.add_full_decode((1, 2, 4), max_model_len=256)
    return runner


def batch(rows: list[tuple[int, int]], mode=None, seed=0) -> ForwardBatch:
    generator = torch.Generator().manual_seed(seed)
    tables = [list(range(1 + 8 * i, 9 + 8 * i)) for i in range(len(rows))]
    tokens = [torch.randint(0, 258, (n,), generator=generator).tolist() for _, n in rows]
    return ForwardBatch.build(
        token_ids=tokens,
        prefix_lens=[p for p, _ in rows],
        block_tables=tables,
        block_size=BLOCK,
        device="cpu",
        mode=mode,
    )


def test_each_batch_kind_takes_its_path(runner):
    graphs = runner.dispatcher
    assert graphs.choose(batch([(0, 10)]))[0] is RunPath.PIECEWISE
    assert graphs.choose(batch([(0, 5), (9, 1)]))[0] is RunPath.PIECEWISE  # mixed
    decode = batch([(9, 1), (12, 1), (30, 1)])
    assert decode.mode is ForwardMode.DECODE
    assert graphs.choose(decode) == (RunPath.FULL_DECODE, None)
    assert graphs.choose(batch([(9, 1)] * 6))[0] is RunPath.PIECEWISE  # over the decode ladder
    assert graphs.choose(batch([(0, 40)])) == (RunPath.EAGER, "too_many_tokens")
    logprobs = batch([(9, 1)])
    logprobs.return_input_logprobs = True
    assert graphs.choose(logprobs) == (RunPath.EAGER, "input_logprobs")


def test_full_decode_pads_rows_and_matches_eager(runner):
    rows = [(9, 1), (12, 1), (30, 1)]
    prefill = batch([(0, 9), (0, 12), (0, 30)], seed=1)
    runner.forward_eager(prefill)  # fill the prefixes the decode rows attend to
    decode = runner.full_decode
    assert sorted(decode.captured) == [1, 2, 4]
    # A full 4-row replay first leaves real slots and lengths in the 4th row of every buffer.
    runner.forward_eager(batch([(0, 9), (0, 12), (0, 30), (0, 20)], seed=1))
    four = batch([(9, 1), (12, 1), (30, 1), (20, 1)], seed=3)
    decode.run(four)
    pool = runner.kv_cache
    before = [k.clone() for k in pool.k_buffers]
    got = decode.run(batch(rows, seed=2)).clone()
    fourth_slot = four.out_cache_loc[3]
    for k, b in zip(pool.k_buffers, before, strict=True):
        assert torch.equal(k[fourth_slot], b[fourth_slot])  # padding never reached the cache
    assert decode.buffers.input_ids[3] == 0 and decode.buffers.positions[3] == 0
    assert decode.buffers.out_cache_loc[3] == DUMMY_SLOT
    state = runner.attn_backend.graph_state
    assert state.seq_lens[:4].tolist() == [10, 13, 31, 1]  # the padding row: length 1
    assert state.block_tables[3, 0] == DUMMY_SLOT // BLOCK
    expected = runner.forward_eager(batch(rows, seed=2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sampling_graphs_draw_what_eager_sampling_draws(runner):
    """Every variant's captured head (LM head + sampling) equals `sample` on eager logits, with
    per-row parameters rewritten between replays and a padded row in the graph, and writes its
    tokens into the buffer the next decode graph reads fed ids from."""
    from tesela.engine.sampling_params import SamplingParams
    from tesela.executor.sampling import SamplingTensors, SamplingVariant, sample

    rows = [(9, 1), (12, 1), (30, 1)]
    runner.forward_eager(batch([(0, 9), (0, 12), (0, 30)], seed=1))
    decode = runner.full_decode
    assert len(decode.sample_graphs) == len(decode.sizes) * len(SamplingVariant.all())
    params = [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.7, top_k=5, seed=3),
        SamplingParams(temperature=1.3, top_p=0.8, seed=4, logprobs=0),
    ]
    vocab = runner.config.model_config.vocab_size
    logits = runner.compute_logits(runner.forward_eager(batch(rows, seed=2)))
    for step in range(3):  # the rows' token index moves: new noise each replay
        tensors = SamplingTensors.build(params, [3, 4, 5], [step] * 3, vocab, "cpu")
        for variant in SamplingVariant.all():
            got = decode.run_sample(batch(rows, seed=2), tensors, variant)
            want = sample(logits, tensors, variant)
            assert got.tokens.tolist() == want.tokens.tolist(), (variant, step)
            # written where the next step's fed ids are read: no copy before that replay
            assert got.tokens.data_ptr() == decode.fed_tokens.data_ptr()
            if variant.logprobs:
                assert got.top_ids.tolist() == want.top_ids.tolist()
                assert (got.logprob - want.logprob).abs().max() < 1e-4
    assert {True, False} == {bool(decode.sampling.greedy[0]), bool(decode.sampling.greedy[1])}


def test_greedy_sampling_graphs_read_no_sampling_tensors(runner):
    """A greedy batch (logprobs or not) gets no SamplingTensors: its graphs take the argmax
    whatever the persistent parameters hold (here garbage), so nothing is built or copied for
    it; a variant that draws refuses to run without them."""
    from tesela.executor.sampling import SamplingVariant, sample

    rows = [(9, 1), (12, 1), (30, 1)]
    runner.forward_eager(batch([(0, 9), (0, 12), (0, 30)], seed=1))
    decode = runner.full_decode
    for field in decode.sampling.FIELDS:
        buffer = getattr(decode.sampling, field)
        buffer.copy_(torch.full_like(buffer, float("nan") if buffer.is_floating_point() else 7))
    logits = runner.compute_logits(runner.forward_eager(batch(rows, seed=2)))
    for variant in SamplingVariant.all():
        if variant.reads_tensors:
            with pytest.raises(ValueError, match="needs the rows' SamplingTensors"):
                decode.run_sample(batch(rows, seed=2), None, variant)
            continue
        got = decode.run_sample(batch(rows, seed=2), None, variant)
        want = sample(logits, None, variant)
        assert got.tokens.tolist() == want.tokens.tolist() == logits.argmax(-1).tolist()
        if variant.logprobs:
            assert (got.logprob - want.logprob).abs().max() < 1e-4


def test_a_decode_batch_with_a_row_that_does_not_sample_samples_the_others(runner):
    """A one-token recompute chunk short of its sequence's end is a decode row that samples
    nothing (a token budget of 3 makes them): the step's tokens are those of the sampling rows
    only, one per row, drawn from their own logits (the sampling graphs draw every row)."""
    from tesela.engine.sampling_params import SamplingParams
    from tesela.executor.sampling import SamplingTensors, SamplingVariant, sample

    runner.forward_eager(batch([(0, 9), (0, 12), (0, 30)], seed=1))
    generator = torch.Generator().manual_seed(2)
    tokens = [torch.randint(0, 258, (1,), generator=generator).tolist() for _ in range(3)]
    decode = ForwardBatch.build(
        token_ids=tokens,
        prefix_lens=[9, 12, 30],
        block_tables=[list(range(1 + 8 * i, 9 + 8 * i)) for i in range(3)],
        block_size=BLOCK,
        device="cpu",
        logits_rows=[0, 2],  # row 1 is mid-recompute: no token to draw
    )
    assert runner.dispatcher.choose(decode) == (RunPath.FULL_DECODE, None)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0)]
    vocab = runner.config.model_config.vocab_size
    tensors = SamplingTensors.build(params, [3, 4], [0, 0], vocab, "cpu")
    got = runner.forward_sample(decode, tensors, SamplingVariant.all()[0])
    logits = runner.compute_logits(runner.forward_eager(decode)[decode.logits_indices])
    assert got.tokens.tolist() == sample(logits, tensors, SamplingVariant.all()[0]).tokens.tolist()
    assert got.tokens.shape[0] == 2


def test_released_graphs_leave_an_eager_runner_that_still_serves():
    """Shutdown frees the graphs before the NCCL group goes (its teardown blocks while they
    live): afterwards no graph runner is reachable and batches still run, eagerly."""
    config, path = make_engine_config(
        "tiny", piecewise_cudagraph="breakable", capture_sizes=[4], num_kv_tokens=512
    )
    runner = ModelRunner(dataclasses.replace(config, attention_backend="triton"), path)
    runner.add_full_decode((1,), max_model_len=128)
    prefill = batch([(0, 3)], seed=4)
    assert runner.dispatcher.choose(prefill)[0] is RunPath.PIECEWISE
    expected = runner.forward(prefill).clone()  # logits, through the piecewise graph
    stray = runner.piecewise  # a reference the shutdown does not know about
    runner.release_cuda_graphs()
    assert runner.piecewise is None and runner.full_decode is None
    # ... cannot keep its graphs alive: every graph the factory made is destroyed.
    with pytest.raises(RuntimeError, match="was reset"):
        stray.captured[4].replay()
    assert set(runner.dispatcher.runners) == {RunPath.EAGER}
    assert runner.dispatcher.choose(prefill)[0] is RunPath.EAGER
    torch.testing.assert_close(runner.forward(batch([(0, 3)], seed=4)), expected)
    assert runner.dispatcher.stats.paths[RunPath.EAGER] == 1


def test_full_decode_plans_share_views_but_each_keeps_its_batch_stamp(runner):
    """A FULL decode plan copies its size's metadata template (the views of the persistent
    buffers, made once) and stamps the copy: a later plan of the same size neither restamps an
    earlier one nor the template, and a plan of another size views a different front."""
    planner = runner.full_decode.planner
    first, second = batch([(9, 1), (12, 1)], seed=1), batch([(30, 1), (7, 1)], seed=2)
    plan_first = planner.plan(first)
    plan_second = planner.plan(second)
    a, b = plan_first.attn_metadata, plan_second.attn_metadata
    assert a.stamp == first.stamp and b.stamp == second.stamp
    assert a is not b and a.seq_lens is b.seq_lens and a.partial_out is b.partial_out
    planner.check_replay(plan_second, second, "test")
    with pytest.raises(StaleMetadataError, match="with a plan made for"):
        planner.check_replay(plan_first, second, "test")
    one = planner.plan(batch([(9, 1)], seed=3)).attn_metadata
    assert one.seq_lens.shape[0] == 1 and one.batch_size == 1
    assert runner.attn_backend._decode_graph(2).stamp is None  # the template stays unstamped
