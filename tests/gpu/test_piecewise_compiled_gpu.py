"""The `compiled` piecewise mode on CUDA: a graph per piece and size, replayed exactly.

A qwen3-0.6b-shaped model with fewer layers, captured at a short ladder with eager pieces (a
replay equals `run_eager_padded` bit for bit) and inductor pieces (fused kernels round
differently: bf16 tolerance). Greedy generation with the full model matches graphs off.
"""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch
from test_piecewise_gpu import random_batch
from torch._dynamo.utils import counters

from tesela import LLM, SamplingParams
from tesela.engine.llm_engine import make_engine_config
from tesela.executor.dispatcher import RunPath
from tesela.executor.graphs import CudaGraphFactory
from tesela.executor.model_runner import ModelRunner
from tesela.layers import fused

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SIZES = [16, 64, 256]
NUM_LAYERS = 4


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module", params=["eager", "inductor"])
def compiled(request):
    """(piece compiler, model runner, dynamo graphs produced while it captured)."""
    before = unique_graphs()
    config, path = make_engine_config(
        "qwen3-0.6b",
        dtype="bfloat16",
        device="cuda",
        num_kv_tokens=8192,
        piecewise_cudagraph="compiled",
        piecewise_compiler=request.param,
        capture_sizes=SIZES,
        full_mixed=False,  # these tests replay piecewise graphs
        max_num_seqs=8,  # a short FULL decode ladder: these tests replay prefill pieces
    )
    model_config = dataclasses.replace(config.model_config, num_hidden_layers=NUM_LAYERS)
    runner = ModelRunner(config.replace(model_config=model_config), path)
    yield request.param, runner, unique_graphs() - before
    del runner
    gc.collect()  # the compiled code and its pieces reference each other
    torch.cuda.empty_cache()


def assert_replay_matches(piecewise_compiler: str, got: torch.Tensor, expected: torch.Tensor):
    if piecewise_compiler == "eager":
        assert torch.equal(got, expected)
        return
    # Inductor fuses norms, rotary and activations and keeps fp32 where eager rounds to bf16
    # (2^-8 relative): a few bf16 steps apart elementwise, ~1e-2 apart overall. Hidden states
    # reach |x| ~ 16, where one bf16 step is 0.0625 (seen on H200: 0.072 at worst), so the
    # elementwise bound is two steps there.
    torch.testing.assert_close(got.float(), expected.float(), rtol=5e-2, atol=0.125)
    error = (got.float() - expected.float()).norm() / expected.float().norm()
    assert error < 2e-2, f"relative error {error:.3g}"


def test_every_piece_is_captured_at_every_size_with_one_compile(compiled):
    _, runner, graphs_at_capture = compiled
    report = runner.dispatcher.runners[RunPath.PIECEWISE].report()
    assert report.cuda_graphs and report.sizes == tuple(SIZES)
    assert report.graph_memory_bytes > 0
    pieces = runner.piecewise.pieces
    assert pieces.num_compiles == 1 and graphs_at_capture == 1
    assert pieces.num_split_calls == NUM_LAYERS and len(pieces.pieces) == NUM_LAYERS + 1
    for piece in pieces.pieces:
        assert sorted(piece.graphs) == SIZES, piece.name


@pytest.mark.parametrize("n", [1, 3, 15, 16, 17, 63, 64, 100, 255, 256])
def test_replay_matches_eager_padded(compiled, n):
    piecewise_compiler, runner, _ = compiled
    piecewise = runner.piecewise
    before = unique_graphs()
    expected = piecewise.run_eager_padded(random_batch([(0, n)], seed=n))
    got = piecewise.run(random_batch([(0, n)], seed=n)).clone()
    assert_replay_matches(piecewise_compiler, got, expected)
    unpadded = runner.forward_eager(random_batch([(0, n)], seed=n))
    torch.testing.assert_close(got.float(), unpadded.float(), rtol=5e-2, atol=0.125)
    # Replays reuse the one compile, and every piece finds its inputs where it captured them.
    assert piecewise.pieces.num_compiles == 1 and unique_graphs() == before
    assert piecewise.pieces.num_input_copies == 0


@pytest.mark.parametrize("n", [1, 5, 16, 17, 64])
def test_eager_pieces_run_the_fused_kernels_bitwise(compiled, n):
    """Eager pieces trace the fused kernels and the GEMV dispatch as tesela:: custom ops, so a
    replay is the eager model's own kernels: bitwise equal with the fused kernels on."""
    piece_compiler, runner, _ = compiled
    if piece_compiler != "eager":
        pytest.skip("inductor pieces trace the PyTorch ops")
    piecewise = runner.piecewise
    split = piecewise.pieces.split
    traced = {
        str(node.target)
        for name in split.piece_names
        for node in split.submodule(name).graph.nodes
        if node.op == "call_function"
    }
    for op in ("qk_norm_rope", "add_norm_linear", "silu_linear", "linear"):
        assert any(t.startswith(f"tesela.{op}") for t in traced), op
    batch = random_batch([(0, n)], seed=100 + n)
    assert fused.fused_enabled(batch.input_ids.new_empty(1, dtype=torch.bfloat16))
    expected = piecewise.run_eager_padded(batch)
    got = piecewise.run(random_batch([(0, n)], seed=100 + n)).clone()
    assert torch.equal(got, expected)
    assert piecewise.pieces.num_compiles == 1


def test_mixed_batches_and_interleaved_sizes_replay_exactly(compiled):
    """Every size shares one pool: replaying sizes in any order must not disturb another."""
    piecewise_compiler, runner, _ = compiled
    piecewise = runner.piecewise
    shapes = [[(0, 7), (33, 1), (16, 20), (5, 1)], [(0, 200)], [(40, 3)], [(0, 60), (2, 4)]]
    for seed in range(2):
        runner.forward_eager(random_batch([(0, 48)] * 4, seed))  # fill prefixes
        for rows in shapes + shapes[::-1]:
            expected = piecewise.run_eager_padded(random_batch(rows, seed))
            got = piecewise.run(random_batch(rows, seed)).clone()
            assert_replay_matches(piecewise_compiler, got, expected)
    assert piecewise.pieces.num_input_copies == 0


def _pool_bytes(pool) -> tuple[int, int, list[str]] | None:
    """(reserved, in use by live tensors, where each live block was allocated) in the graph
    pool `pool`, from a memory snapshot (frames only while memory history is recorded)."""
    segments = torch.cuda.memory._snapshot()["segments"]
    if segments and "segment_pool_id" not in segments[0]:
        return None
    mine = [s for s in segments if tuple(s["segment_pool_id"]) == tuple(pool)]
    reserved = sum(s["total_size"] for s in mine)
    live = [b for s in mine for b in s["blocks"] if b["state"] == "active_allocated"]
    origins = [
        f"{b['size']} B at "
        + " <- ".join(
            f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']}:{f['name']}"
            for f in b.get("frames", [])
            if "tesela" in f["filename"] or "torch/_inductor" in f["filename"]
        )[:1500]
        for b in live
    ]
    return reserved, sum(b["size"] for b in live), origins


def test_captured_pieces_hold_no_pool_memory(compiled):
    """Static inputs and outputs are non-owning aliases: once a size is captured, its pool
    memory is all free for the next size (and nothing in it is kept alive by the pieces)."""
    piecewise_compiler, runner, _ = compiled
    piecewise = runner.piecewise
    factory = CudaGraphFactory(runner.device)  # a pool of its own, to measure
    pool = factory.pool
    extra = 128  # outside the ladder: never replayed by the runner
    piecewise.pieces.graphs = factory
    torch.cuda.memory._record_memory_history(max_entries=200_000)  # to name a leaked block
    try:
        with torch.cuda.stream(torch.cuda.Stream()), torch.inference_mode():
            warmup = piecewise._capture_batch(extra)
            piecewise._forward(warmup, runner.planner.plan(warmup), extra)
            batch = piecewise._capture_batch(extra)
            piecewise._capture_size(batch, runner.planner.plan(batch), extra)
    finally:
        piecewise.pieces.graphs = runner.graph_factory
    torch.cuda.synchronize()
    measured = _pool_bytes(pool)
    torch.cuda.memory._record_memory_history(enabled=None)
    if measured is None:
        pytest.skip("this torch's memory snapshot has no segment_pool_id")
    reserved, in_use, origins = measured
    assert reserved > 0 and in_use == 0, origins
    assert all(extra in piece.graphs for piece in piecewise.pieces.pieces)
    # The runner's ladder is untouched and still replays exactly.
    expected = piecewise.run_eager_padded(random_batch([(0, 100)], seed=5))
    got = piecewise.run(random_batch([(0, 100)], seed=5)).clone()
    assert_replay_matches(piecewise_compiler, got, expected)


def test_greedy_generations_identical_with_compiled_graphs_on_and_off():
    prompts = [list(range(100 + i, 100 + i + n)) for i, n in enumerate([3, 17, 64, 200, 9])]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    common = dict(
        load_format="dummy",
        dtype="bfloat16",
        num_kv_tokens=16384,
        max_num_batched_tokens=512,
        max_num_seqs=8,
    )
    on = LLM(
        "qwen3-0.6b",
        piecewise_cudagraph="compiled",
        capture_sizes=[8, 16, 64, 128, 256, 512],
        full_mixed=False,
        **common,
    )
    on_tokens = [o.token_ids for o in on.generate(prompts, params)]
    assert on.engine.stats()["dispatch"]["paths"]["piecewise"] > 0
    assert on.engine.runner.piecewise.pieces.num_compiles == 1
    del on
    gc.collect()
    torch.cuda.empty_cache()
    off = LLM("qwen3-0.6b", disable_cudagraph=True, **common)
    assert [o.token_ids for o in off.generate(prompts, params)] == on_tokens
