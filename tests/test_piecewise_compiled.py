"""The `compiled` piecewise mode on CPU: one compile, split at attention, pieces equal eager.

On CPU the runner captures every piece at every size with the CPU stand-in graph
(tesela/executor/graphs.py) through the same code as on CUDA, so the trace, the split, the
symbolic token count, the piece compilers and the capture bookkeeping are all exercised here.
Real CUDA graphs per piece are tested in tests/gpu/test_piecewise_compiled_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from tesela import LLM
from tesela.attention.base import StaleMetadataError
from tesela.config import default_capture_sizes
from tesela.core.forward_batch import ForwardBatch
from tesela.core.forward_context import forward_context
from tesela.engine.llm_engine import make_engine_config
from tesela.executor.model_runner import ModelRunner
from tesela.executor.piecewise.compiled import CapturedPiece, CompiledPieces, is_split_op

LADDER_MAX = 64
COMMON = dict(num_kv_tokens=4096, max_num_batched_tokens=LADDER_MAX)


def boundary_counts(sizes) -> list[int]:
    counts = {1, 2, 3}
    for s in sizes:
        counts.update({s - 1, s, s + 1})
    return sorted(c for c in counts if 0 < c <= sizes[-1])


def random_batch(num_tokens: int, seed: int) -> ForwardBatch:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 258, (num_tokens,), generator=generator).tolist()
    return ForwardBatch.build(
        token_ids=[tokens],
        prefix_lens=[0],
        block_tables=[list(range(1, num_tokens // 16 + 2))],
        block_size=16,
        device="cpu",
    )


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def new_pieces(runner: ModelRunner) -> CompiledPieces:
    return CompiledPieces(runner.model, runner.piecewise.sizes, "eager", runner.graph_factory)


def compiled_runner(piecewise_compiler: str, **overrides) -> tuple[ModelRunner, int]:
    """A model runner with compiled pieces, and the dynamo graphs its capture produced."""
    before = unique_graphs()
    config = make_engine_config(
        "tiny",
        piecewise_cudagraph="compiled",
        piecewise_compiler=piecewise_compiler,
        **{**COMMON, **overrides},
    )
    runner = ModelRunner(*config)
    return runner, unique_graphs() - before


@pytest.fixture(scope="module")
def runners():
    eager = ModelRunner(*make_engine_config("tiny", **COMMON))
    compiled, graphs_at_capture = compiled_runner("eager")
    return eager, compiled, graphs_at_capture


def test_one_compile_serves_every_size_bitwise(runners):
    eager, compiled, graphs_at_capture = runners
    piecewise = compiled.piecewise
    assert piecewise.sizes == default_capture_sizes(LADDER_MAX)
    pieces = piecewise.pieces
    before = unique_graphs()
    for n in boundary_counts(piecewise.sizes):
        padded = piecewise.run_eager_padded(random_batch(n, seed=n))
        unpadded = eager.forward_eager(random_batch(n, seed=n))
        got = compiled.dispatcher.run(random_batch(n, seed=n))
        assert got.shape == unpadded.shape == (n, 64)
        # Eager pieces run the traced ops as written: the same kernels as the eager model.
        assert torch.equal(got, padded), f"num_tokens={n}"
        torch.testing.assert_close(got, unpadded, rtol=1e-5, atol=1e-5)
    # The capture warmed up every size of the ladder; the runs above reused that compile.
    assert pieces.num_compiles == 1
    assert graphs_at_capture == 1 and unique_graphs() == before
    assert compiled.dispatcher.stats.paths[compiled.dispatcher.choose(random_batch(5, 0))[0]] > 0


def test_graph_is_split_at_every_attention_call(runners):
    _, compiled, _ = runners
    pieces = compiled.piecewise.pieces
    num_layers = compiled.config.model_config.num_hidden_layers
    assert pieces.num_split_calls == num_layers
    assert len(pieces.pieces) == num_layers + 1
    split = pieces.split
    called = [n.target for n in split.module.graph.nodes if n.op == "call_module"]
    # piece, attention, piece, attention, ..., piece: in the model's order.
    assert called[0::2] == split.piece_names and called[1::2] == split.split_names
    for name in split.split_names:
        nodes = [n for n in split.submodule(name).graph.nodes if n.op == "call_function"]
        assert len(nodes) == 1 and is_split_op(nodes[0])
    for name in split.piece_names:
        graph = split.submodule(name).graph
        assert not any(is_split_op(n) for n in graph.nodes)
        # The split graph calls our Piece wrapper: it runs the piece (on CUDA, its graphs).
        assert getattr(split.module, name) is pieces.pieces[split.piece_names.index(name)]


def test_attention_reads_the_batch_at_run_time(runners):
    """The split op is not traced into the pieces: it checks the metadata of the batch being
    run, so compiled pieces keep the metadata invariant (docs/architecture.md, "The metadata invariant")."""
    _, compiled, _ = runners
    piecewise = compiled.piecewise
    planned = random_batch(8, seed=1)
    plan = compiled.planner.plan(planned)
    other = random_batch(8, seed=2)
    piecewise.buffers.copy_from(other, 8)
    stale = rf"ran batch #{other.batch_id} .* made for batch #{planned.batch_id} "
    with pytest.raises(StaleMetadataError, match=stale), torch.inference_mode():
        piecewise._forward(other, plan, 8)


def test_ladder_reaching_one_token_compiles_once():
    runner, graphs_at_capture = compiled_runner("eager", capture_sizes=[1, 2, 4, 8])
    piecewise = runner.piecewise
    for n in range(1, 9):
        expected = piecewise.run_eager_padded(random_batch(n, seed=n))
        assert torch.equal(runner.dispatcher.run(random_batch(n, seed=n)), expected)
    assert piecewise.pieces.num_compiles == 1 and graphs_at_capture == 1


def test_each_engine_compiles_its_own_model(runners):
    """Dynamo caches compiled code per code object. Were engines to share one, each new
    engine would count as a recompile of the others, and the one past dynamo's recompile
    limit would fail (fullgraph=True): every CompiledPieces has its own entry point."""
    _, compiled, _ = runners
    piecewise = compiled.piecewise
    batch = random_batch(8, seed=3)
    plan = compiled.planner.plan(batch)
    piecewise.buffers.copy_from(batch, 8)
    engines, outputs = [], []
    with torch._dynamo.config.patch(recompile_limit=2), torch.inference_mode():
        for _ in range(3):
            engines.append(new_pieces(compiled))
            with forward_context(batch, plan, compiled.attn_backend):
                outputs.append(engines[-1](*piecewise.buffers.slice(8)).clone())
    assert [e.num_compiles for e in engines] == [1, 1, 1]
    assert engines[0].pieces[0] is not engines[1].pieces[0]
    assert all(torch.equal(out, outputs[0]) for out in outputs)


def test_capturing_needs_a_compiled_model_and_does_not_nest(runners):
    _, compiled, _ = runners
    fresh = new_pieces(compiled)
    with pytest.raises(RuntimeError, match="before the first run"), fresh.capturing(8):
        pass
    pieces = compiled.piecewise.pieces
    nested = pytest.raises(RuntimeError, match="do not nest")
    with pieces.capturing(8), nested, pieces.capturing(4):
        pass
    assert pieces.capture_size is None


class _NoGraph:
    replays = 0

    def replay(self) -> None:
        self.replays += 1


def test_replay_copies_only_inputs_that_moved():
    static = torch.zeros(4)
    output = torch.ones(4)
    graph = _NoGraph()
    captured = CapturedPiece(graph, [(0, static, static.data_ptr())], (output,))
    assert captured.replay((static, 4)) == (output,)  # same address: nothing to copy
    assert captured.input_copies == 0
    moved = torch.arange(4.0)
    captured.replay((moved, 4))
    assert torch.equal(static, moved) and captured.input_copies == 1 and graph.replays == 2


def test_real_capture_records_every_piece_at_every_size(runners):
    """The runner captured each piece at each size through the graph factory (on CPU its
    stand-in); a replay finds every input where it was captured and returns static outputs."""
    _, compiled, _ = runners
    piecewise = compiled.piecewise
    pieces = piecewise.pieces
    assert all(sorted(piece.graphs) == list(piecewise.sizes) for piece in pieces.pieces)
    outputs = {}
    for n in (8, 16, 8):
        got = compiled.dispatcher.run(random_batch(n, seed=n))
        outputs.setdefault(n, got.data_ptr())
        assert got.data_ptr() == outputs[n]  # the static output of that size
    assert pieces.num_input_copies == 0 and pieces.num_compiles == 1


@pytest.mark.slow  # ~20 s with a cold inductor cache (its first C++ build), ~5 s warm
def test_inductor_pieces_match_eager(runners):
    eager, _, _ = runners
    runner, graphs_at_capture = compiled_runner("inductor", capture_sizes=[4, 8, 16, 32])
    piecewise = runner.piecewise
    for n in (1, 5, 16, 17, 32):
        expected = piecewise.run_eager_padded(random_batch(n, seed=n))
        got = runner.dispatcher.run(random_batch(n, seed=n))
        # Fused kernels round differently from eager ones: float32 rounding apart.
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        unpadded = eager.forward_eager(random_batch(n, seed=n))
        torch.testing.assert_close(got, unpadded, rtol=1e-4, atol=1e-4)
    assert piecewise.pieces.num_compiles == 1 and graphs_at_capture == 1
    assert len(piecewise.pieces.pieces) == runner.config.model_config.num_hidden_layers + 1


def test_verify_at_startup_finds_compiled_pieces_exact():
    llm = LLM(
        "tiny", piecewise_cudagraph="compiled", capture_sizes=[4, 16, 48], verify_cudagraphs=True
    )
    report = llm.engine.runner.dispatcher.reports()[0]
    assert report.verify_max_abs_diff == {4: 0.0, 16: 0.0, 48: 0.0}


def test_replay_of_a_captured_size_skips_dynamo(runners):
    """Dynamo's guards run on the first call of each size at most: a replay calls the split
    graph directly, and still equals the same padded forward run eagerly."""
    _, compiled, _ = runners
    piecewise = compiled.piecewise
    pieces = piecewise.pieces
    assert pieces._graph_call.direct
    assert pieces.captured_sizes == set(piecewise.sizes)
    dynamo_calls = []
    through_dynamo = pieces._compiled
    pieces._compiled = lambda *args: dynamo_calls.append(1) or through_dynamo(*args)
    try:
        for n in (3, 16, 40):
            got = compiled.dispatcher.run(random_batch(n, seed=n))
            assert torch.equal(got, piecewise.run_eager_padded(random_batch(n, seed=n)))
    finally:
        pieces._compiled = through_dynamo
    assert dynamo_calls == []
