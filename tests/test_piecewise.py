"""The piecewise runner on CPU: padding, static buffers, slicing, fallback and metadata.

On CPU the runner captures with a stand-in graph (tesela/executor/graphs.py): the same code
(ladder, static buffers, padding, planning of every warmup/capture/replay, segment recording)
drives the CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch

from tesela import LLM, SamplingParams
from tesela.attention.base import StaleMetadataError
from tesela.config import default_capture_sizes
from tesela.core.forward_batch import ForwardBatch
from tesela.engine.llm_engine import make_engine_config
from tesela.executor.model_runner import ModelRunner

LADDER_MAX = 320


def boundary_counts(sizes) -> list[int]:
    counts = {1, 2, 3}
    for s in sizes:
        counts.update({s - 1, s, s + 1})
    return sorted(c for c in counts if 0 < c <= sizes[-1])


@pytest.fixture(scope="module")
def runners():
    common = dict(num_kv_tokens=4096, max_num_batched_tokens=LADDER_MAX)
    eager = ModelRunner(*make_engine_config("tiny", **common))
    piecewise = ModelRunner(*make_engine_config("tiny", piecewise_cudagraph="breakable", **common))
    return eager, piecewise


def random_batch(num_tokens: int, seed: int, prefix: int = 0) -> ForwardBatch:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 258, (num_tokens,), generator=generator).tolist()
    total = prefix + num_tokens
    return ForwardBatch.build(
        token_ids=[tokens],
        prefix_lens=[prefix],
        block_tables=[list(range(1, total // 16 + 2))],
        block_size=16,
        device="cpu",
    )


def test_default_ladder_shape():
    sizes = default_capture_sizes(2048)
    assert sizes[:8] == (4, 8, 12, 16, 20, 24, 28, 32)
    assert 256 in sizes and 1024 in sizes and sizes[-1] == 2048
    assert default_capture_sizes(1000)[-1] == 1000  # the max is always captured
    assert default_capture_sizes(6000)[-2:] == (5632, 6000)


def test_piecewise_equals_eager_at_every_boundary(runners):
    eager, piecewise = runners
    runner = piecewise.piecewise
    assert runner.sizes == default_capture_sizes(LADDER_MAX)
    for n in boundary_counts(runner.sizes):
        padded = runner.run_eager_padded(random_batch(n, seed=n))
        unpadded = eager.forward_eager(random_batch(n, seed=n))
        got = piecewise.dispatcher.run(random_batch(n, seed=n))
        assert got.shape == unpadded.shape == (n, 64)
        assert torch.equal(got, padded), f"num_tokens={n}"
        # Padding changes GEMM row counts, hence kernels: equal up to float32 rounding.
        torch.testing.assert_close(got, unpadded, rtol=1e-5, atol=1e-5)
    stats = piecewise.dispatcher.stats
    assert stats.paths[piecewise.dispatcher.choose(random_batch(5, 0))[0]] > 0


def test_padding_is_zeroed_and_never_reaches_the_kv_cache(runners):
    _, piecewise = runners
    pool = piecewise.kv_cache
    before = [k.clone() for k in pool.k_buffers]
    batch = random_batch(5, seed=7)
    piecewise.dispatcher.run(batch)
    size = piecewise.piecewise.padded_size(5)
    assert size == 8
    buffers = piecewise.piecewise.buffers
    assert torch.equal(buffers.input_ids[:5], batch.input_ids)
    assert buffers.input_ids[5:8].eq(0).all() and buffers.positions[5:8].eq(0).all()
    written = [
        (k != b).any(dim=(1, 2)).nonzero().flatten()
        for k, b in zip(pool.k_buffers, before, strict=True)
    ]
    for slots in written:
        assert set(slots.tolist()) <= set(batch.out_cache_loc.tolist())
        assert 0 not in slots.tolist()  # the dummy slot is untouched by real batches


def test_fallbacks_are_counted_by_reason(runners):
    _, piecewise = runners
    graphs = piecewise.dispatcher
    graphs.stats.fallbacks.clear()
    graphs.run(random_batch(LADDER_MAX + 1, seed=1))
    logprob_batch = random_batch(10, seed=2)
    logprob_batch.return_input_logprobs = True
    graphs.run(logprob_batch)
    assert graphs.stats.fallbacks == {"too_many_tokens": 1, "input_logprobs": 1}


@pytest.mark.parametrize("mode", ["breakable", "compiled"])
def test_greedy_generations_identical_with_graphs_on_and_off(mode):
    prompts = ["piecewise", "graphs " * 9, "q", "a longer prompt that crosses a few sizes" * 3]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    off = LLM("tiny", max_num_batched_tokens=64).generate(prompts, params)
    on_llm = LLM("tiny", piecewise_cudagraph=mode, max_num_batched_tokens=64)
    on = on_llm.generate(prompts, params)
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    paths = on_llm.engine.stats()["dispatch"]["paths"]
    assert paths["piecewise"] > 0 and paths["eager"] == 0
    if mode == "compiled":
        assert on_llm.engine.runner.piecewise.pieces.num_compiles == 1


# ---- the two historical metadata bugs (SGLang), on the real runner ---------------------------
# Mutating the runner to warm up or capture with a plan made for another batch (another size,
# the warmup's, a decode batch's) makes the capture below fail: scripts/mutations.py shows it.


def test_real_capture_warms_up_and_captures_every_size(runners):
    """On CPU the runner captured every size through the same warmup -> capture code as on
    CUDA (a stand-in graph), each size planned for itself; replays of any size, in any order,
    equal the eager padded computation."""
    _, model_runner = runners
    runner = model_runner.piecewise
    layers = model_runner.config.model_config.num_hidden_layers
    assert sorted(runner.captured) == list(runner.sizes)
    for graph in runner.captured.values():
        assert len(graph.segments) == layers + 1 and len(graph.splits) == layers
    for n in (17, 4, 300, 17):
        expected = runner.run_eager_padded(random_batch(n, seed=n))
        assert torch.equal(runner.run(random_batch(n, seed=n)), expected), n


def test_a_plan_from_another_batch_is_refused_by_the_real_runner(runners):
    """SGLang #12067 (an EXTEND warmup ran on DECODE metadata) and the first fix's bug (one
    plan for a 2-token warmup reused at every size) both reach the split op with a plan made for
    another batch: the real runner's pass refuses it, naming both batches."""
    _, model_runner = runners
    runner = model_runner.piecewise
    decode = ForwardBatch.build(
        token_ids=[[1], [2]],
        prefix_lens=[3, 4],
        block_tables=[[1], [2]],
        block_size=16,
        device="cpu",
    )
    for stale in (decode, runner._capture_batch(2)):
        batch = runner._capture_batch(16)
        refused = pytest.raises(StaleMetadataError, match="planner.plan")
        with refused as error, torch.inference_mode():
            runner._forward(batch, model_runner.planner.plan(stale), 16)
        assert "extend, 16 tokens" in str(error.value) and str(stale.stamp) in str(error.value)


def test_verify_compares_every_captured_size_at_startup():
    llm = LLM(
        "tiny", piecewise_cudagraph="breakable", capture_sizes=[4, 16, 48], verify_cudagraphs=True
    )
    report = llm.engine.runner.dispatcher.reports()[0]
    assert report.verify_max_abs_diff == {4: 0.0, 16: 0.0, 48: 0.0}
