"""The engine under KV pressure on CPU, for the torch and the Triton backend.

A pool far smaller than the work makes the scheduler preempt over and over; tiny token budgets
turn every prefill and every recompute into small chunks, so batches made only of recompute
chunks past the prompt occur (the batches that were once labelled DECODE and crashed the
Triton decode kernel). Greedy tokens must equal those of a roomy pool, every request must
finish, and no KV block may stay allocated.

The Triton tests need TRITON_INTERPRET=1 before triton is first imported; when the suite has
already imported triton without it, they run again in a fresh process (as in
tests/test_triton_attention.py).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from interpreter import rerun_under_interpreter, triton_interpreted

from tesela import LLM, SamplingParams
from tesela.core.forward_batch import BatchModeError, ForwardBatch, ForwardMode
from tesela.engine.request import Request

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


INTERPRETED_HERE = triton_interpreted()
BLOCK_SIZE = 4
# Sixteen requests of 2..20 prompt tokens and 16 new tokens each (up to 36 tokens, 9 blocks):
# together they need ~100 blocks, the small pool holds 10.
LENGTHS = [9, 20, 5, 14, 17, 3, 11, 8, 2, 19, 6, 13, 16, 4, 10, 7]
PROMPTS = [[(7 * i + j) % 250 + 3 for j in range(n)] for i, n in enumerate(LENGTHS)]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
TRITON_GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
BUDGETS = [1, 3, 64]


# The interpreter runs each Triton launch in Python: the Triton runs take a lighter workload
# (four requests, 8 new tokens, a 28-token pool), still preempting several times.
WORKLOADS = {"torch": (PROMPTS, GREEDY, 40), "triton": (PROMPTS[:4], TRITON_GREEDY, 28)}


def generate(backend: str, num_requests: int | None = None, graphs: bool = False, **kwargs):
    """With `graphs`, the Triton run goes through piecewise graphs and FULL decode graphs on
    the CPU stand-in graph (tesela/executor/graphs.py): the same capture and replay code as
    on a GPU, under the same pressure."""
    prompts, params, _ = WORKLOADS[backend]
    if graphs:
        budget = kwargs["max_num_batched_tokens"]
        kwargs.update(prefill_graph="breakable", capture_sizes=sorted({min(8, budget), budget}))
    llm = LLM("tiny", attention_backend=backend, block_size=BLOCK_SIZE, **kwargs)
    if graphs:  # the engine captures FULL decode graphs on CUDA only
        llm.engine.runner.add_full_decode((1, 2, 4), llm.engine.config.scheduler.max_model_len)
    return llm, llm.generate(prompts[:num_requests], params)


_references: dict[str, list[list[int]]] = {}


def roomy_reference(backend: str) -> list[list[int]]:
    if backend not in _references:
        llm, outputs = generate(backend)
        assert llm.engine.scheduler.num_preemptions == 0
        _references[backend] = [o.token_ids for o in outputs]
    return _references[backend]


def check_under_pressure(
    backend: str, budget: int, graphs: bool = False, overlap: str = "auto"
) -> int:
    """`overlap` "on": the next step is scheduled while this one's tokens are in flight, so
    preemptions and length stops meet requests with a token in flight (the pool's 28-token
    max_model_len is exactly prompt + max_tokens for one of the Triton prompts)."""
    prompts, params, pool_tokens = WORKLOADS[backend]
    # A budget of one token runs one request at a time (see below): a few show it.
    num_requests = (2 if backend == "torch" else 1) if budget == 1 else len(prompts)
    llm, outputs = generate(
        backend,
        num_requests,
        graphs,
        num_kv_tokens=pool_tokens,
        max_num_batched_tokens=budget,
        overlap_schedule=overlap,
    )
    # Greedy tokens do not depend on the batch (tests/test_engine.py), so a prefix of the
    # roomy run is the reference of a prefix of the requests.
    assert [o.token_ids for o in outputs] == roomy_reference(backend)[:num_requests]
    assert all(o.finished and o.finish_reason == "length" for o in outputs)
    assert all(len(o.token_ids) == params.max_tokens for o in outputs)
    engine = llm.engine
    assert not engine.has_unfinished()
    assert engine.block_manager.num_used_blocks == 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
    stats = engine.stats()
    print(f"{backend} budget {budget}: {stats['num_preemptions']} preemptions, {stats['dispatch']}")
    if graphs:  # both graph paths served steps under pressure
        assert (
            stats["dispatch"]["paths"]["full"] > 0 and stats["dispatch"]["paths"]["piecewise"] > 0
        )
    return stats["num_preemptions"]


def expected_min_preemptions(backend: str, budget: int) -> int:
    # A budget of one token serves one request at a time (the running one takes the whole
    # budget, nothing new is admitted), so it never runs out of blocks.
    if budget == 1:
        return 0
    return 15 if backend == "torch" else 2


@pytest.mark.parametrize("budget", BUDGETS)
def test_torch_backend_under_kv_pressure(budget):
    preemptions = check_under_pressure("torch", budget)
    assert preemptions >= expected_min_preemptions("torch", budget)


@pytest.mark.parametrize("budget", [3, 64])
def test_torch_backend_under_kv_pressure_with_overlap(budget):
    preemptions = check_under_pressure("torch", budget, overlap="on")
    assert preemptions >= expected_min_preemptions("torch", budget)


@pytest.fixture
def interpreted():
    if not INTERPRETED_HERE:
        pytest.skip("triton not loaded under TRITON_INTERPRET here: run by the fresh process")


@pytest.mark.parametrize(
    ("budget", "graphs", "overlap"),
    [(1, False, "off"), (3, False, "off"), (3, True, "off"), (64, True, "off"), (3, True, "on")],
    ids=str,
)
def test_triton_backend_under_kv_pressure(interpreted, budget, graphs, overlap):
    preemptions = check_under_pressure("triton", budget, graphs, overlap)
    assert preemptions >= expected_min_preemptions("triton", budget)


def test_triton_in_a_fresh_interpreter_process():
    """Run this module's Triton tests where TRITON_INTERPRET=1 is set before triton loads."""
    if INTERPRETED_HERE or torch.cuda.is_available():
        pytest.skip("the Triton tests run in this process (or on the GPU suite)")
    pytest.importorskip("triton")
    rerun_under_interpreter(__file__, "-k", "triton_backend or refuse", no_skips=True)


# --- the batch mode comes from the rows ------------------------------------------------------


def build(token_ids, prefix_lens, mode=None):
    tables = [
        list(range(1, 1 + -(-(p + len(t)) // BLOCK_SIZE)))
        for t, p in zip(token_ids, prefix_lens, strict=True)
    ]
    return ForwardBatch.build(
        token_ids=token_ids,
        prefix_lens=prefix_lens,
        block_tables=tables,
        block_size=BLOCK_SIZE,
        device="cpu",
        mode=mode,
    )


def test_recompute_chunks_past_the_prompt_are_extend_work():
    """After preemption a request with a 5-token prompt and 4 generated tokens recomputes;
    its chunk [6, 8) lies past the prompt, yet it brings two tokens: not a decode row."""
    request = Request("r", [3, 4, 5, 6, 7], GREEDY, output_token_ids=[8, 9, 10, 11])
    chunk = request.all_token_ids[6:8]
    assert build([chunk, chunk], [6, 6]).mode is ForwardMode.EXTEND
    assert build([chunk, [12]], [6, 9]).mode is ForwardMode.MIXED
    assert build([[12], [12]], [9, 9]).mode is ForwardMode.DECODE


def test_a_decode_label_on_multi_token_rows_cannot_be_built():
    with pytest.raises(BatchModeError, match="exactly one new token per row"):
        build([[1, 2], [3, 4]], [6, 6], mode=ForwardMode.DECODE)
    good = build([[1], [2]], [6, 6])
    fields = {name: getattr(good, name) for name in good.__dataclass_fields__}
    fields.update(seq_lens_cpu=[8, 8], input_ids=torch.zeros(4, dtype=torch.int64), batch_id=10**9)
    with pytest.raises(BatchModeError, match=r"\[2, 2\]"):
        ForwardBatch(**fields)  # the dataclass constructor checks too


# --- every runner refuses a batch it cannot serve, by name, before any kernel runs ----------


@pytest.fixture(scope="module")
def triton_runner():
    if not INTERPRETED_HERE:
        pytest.skip("triton not loaded under TRITON_INTERPRET here: run by the fresh process")
    from tesela.attention.triton_backend import TritonAttentionBackend
    from tesela.engine.llm_engine import make_engine_config
    from tesela.executor.model_runner import ModelRunner

    config, path = make_engine_config(
        "tiny",
        attention_backend="triton",
        prefill_graph="breakable",
        capture_sizes=[4, 8],
        num_kv_tokens=256,
        block_size=4,
    )
    runner = ModelRunner(config, path)
    assert isinstance(runner.attn_backend, TritonAttentionBackend)
    runner.add_full_decode((1, 2, 4), max_model_len=64)  # CPU stand-in graphs
    return runner


def test_runners_refuse_what_they_cannot_serve(triton_runner):
    from tesela.executor.dispatcher import RunPath

    dispatcher = triton_runner.dispatcher
    full_decode = dispatcher.runner(RunPath.FULL_DECODE)
    piecewise = dispatcher.runner(RunPath.PIECEWISE)
    recompute = build([[5, 6], [7, 8]], [6, 6])  # two recompute chunks past their prompts
    assert full_decode.can_run(recompute) == "not_decode"
    with pytest.raises(ValueError, match="FULL decode graph runner cannot serve .*not_decode"):
        full_decode.run(recompute)
    assert dispatcher.choose(recompute) == (RunPath.PIECEWISE, None)
    assert dispatcher.run(recompute).shape[0] == 4  # served, by the path that can
    too_long = build([list(range(3, 15))], [0])  # 12 tokens, captured up to 8
    with pytest.raises(ValueError, match="piecewise runner cannot serve .*too_many_tokens"):
        piecewise.run(too_long)
    assert dispatcher.choose(too_long) == (RunPath.EAGER, "too_many_tokens")
