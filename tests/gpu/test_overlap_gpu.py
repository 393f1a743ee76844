"""Sampling in the FULL decode graph and overlap scheduling on CUDA.

Greedy and seeded outputs are identical with overlap on and off and graphs on and off; the
hashed noise is bit-identical on CPU and CUDA (so a seed draws the same tokens on any device);
no KV block is left allocated. Under KV pressure (preemption by recompute), with stop tokens,
max_tokens and an abort while a token is in flight, overlap on equals overlap off and streams
nothing past a stop. Run with `-s` to see the dispatch paths and preemption counts.
"""

from __future__ import annotations

import pytest
import torch

from tesela import LLM, SamplingParams
from tesela.engine.llm_engine import LLMEngine
from tesela.executor.sampling import SamplingTensors, SamplingVariant, sample, uniform_noise

# ids under 258: inside the vocabulary of every model here, `tiny` included
PROMPTS = [[5, 17, 42, 8, 99, 3], [7, 7, 7, 250, 13], [200, 201, 12, 77, 54, 23, 9, 81, 44, 6, 1]]


def test_noise_and_draws_are_identical_on_cpu_and_cuda():
    seeds = torch.tensor([0, 7, 2**32 - 1, 123456789])
    index = torch.tensor([0, 3, 1000, 5])
    cpu = uniform_noise(seeds, index, 151936)
    cuda = uniform_noise(seeds.cuda(), index.cuda(), 151936)
    assert torch.equal(cpu, cuda.cpu())
    params = [SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=s) for s in range(4)]
    logits = torch.randn(4, 151936, generator=torch.Generator().manual_seed(0))
    variant = SamplingVariant(random=True, filtered=True)
    host = SamplingTensors.build(params, list(range(4)), [2] * 4, 151936, "cpu")
    device = SamplingTensors.build(params, list(range(4)), [2] * 4, 151936, "cuda")
    assert torch.equal(
        sample(logits, host, variant).tokens, sample(logits.cuda(), device, variant).tokens.cpu()
    )


def generate(model: str, overlap: bool, graphs: bool, params) -> tuple[list[list[int]], LLM]:
    llm = LLM(
        model,
        device="cuda",
        num_kv_tokens=8192,
        capture_sizes=[4, 8, 16, 32],
        disable_cudagraph=not graphs,
        overlap_schedule="on" if overlap else "off",
    )
    prompts = PROMPTS * 3  # 9 rows: FULL decode pads them to a captured size
    outputs = llm.generate(prompts, params)
    assert llm.engine.block_manager.num_used_blocks == 0
    return [o.token_ids for o in outputs], llm


@pytest.mark.parametrize("model", ["tiny", "qwen3-0.6b"])
def test_outputs_equal_with_overlap_and_graphs_on_and_off(model):
    """Overlap never changes a batch, so on/off is bit-exact on every model. Graphs on/off is
    exact in float32 (tiny); in bf16 (qwen3, random weights: near-tied logits) padded and
    unpadded GEMMs may round differently (docs/architecture.md), so there only overlap on/off
    is compared."""
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=24, temperature=0.8, top_k=50, seed=42, ignore_eos=True)
    params = [greedy, seeded, greedy] * 3
    eager, _ = generate(model, overlap=False, graphs=False, params=params)
    graphed, _ = generate(model, overlap=False, graphs=True, params=params)
    if model == "tiny":
        assert graphed == eager
    for graphs, reference in ((False, eager), (True, graphed)):
        got, llm = generate(model, overlap=True, graphs=graphs, params=params)
        assert got == reference, (model, graphs)
        if graphs:
            paths = llm.engine.stats()["dispatch"]["paths"]
            assert paths["full"] > 0, paths
    reference = graphed
    # A seeded request alone draws what it drew in the batch.
    alone, _ = generate(model, overlap=True, graphs=True, params=[seeded] * 9)
    assert alone[1] == reference[1]


PRESSURE_LENGTHS = [9, 130, 33, 77, 18, 101]


def pressure_prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(12)
    return [torch.randint(10, 30000, (n,), generator=generator).tolist() for n in PRESSURE_LENGTHS]


def pressure_engine(overlap: bool) -> LLMEngine:
    """qwen3-0.6b in fp32 (batch composition cannot flip a greedy choice) on a 256-token pool
    with the default graphs (piecewise or FULL mixed, FULL decode with sampling inside)."""
    llm = LLM(
        "qwen3-0.6b",
        load_format="dummy",
        dtype="float32",
        device="cuda",
        num_kv_tokens=256,
        max_num_batched_tokens=64,
        overlap_schedule="on" if overlap else "off",
    )
    assert llm.engine.config.overlap_schedule is overlap
    return llm.engine


def drive(engine: LLMEngine, params: list[SamplingParams], abort: str | None = None, at: int = 0):
    """Every request to the end; {id: (final token ids, streamed ids, finish reason)}."""
    ids = [
        engine.add_request(p, sp, request_id=f"r{i}")
        for i, (p, sp) in enumerate(zip(pressure_prompts(), params, strict=True))
    ]
    streamed, finals, step = {i: [] for i in ids}, {}, 0
    while engine.has_unfinished():
        for output in engine.step():
            streamed[output.request_id] += output.new_token_ids
            if output.finished:
                finals[output.request_id] = (output.token_ids, output.finish_reason)
        step += 1
        if abort is not None and step == at:
            assert engine.abort(abort)
    assert engine.block_manager.num_used_blocks == 0  # no KV leaked
    return {i: (finals[i][0], streamed[i], finals[i][1]) for i in ids}


def test_overlap_equals_no_overlap_under_pressure_stops_and_abort():
    free = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    engines = {overlap: pressure_engine(overlap) for overlap in (False, True)}
    baseline = drive(engines[False], [free] * 6)
    stop_token = baseline["r1"][0][40]
    params = [
        free,
        SamplingParams(
            max_tokens=120, temperature=0, ignore_eos=True, stop_token_ids=(stop_token,)
        ),
        SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=120, temperature=0.8, top_k=50, seed=3, ignore_eos=True),
        free,
        SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
    ]
    results = {}
    for overlap, engine in engines.items():
        results[overlap] = drive(engine, params, abort="r4", at=30)
        stats = engine.stats()
        print(f"\noverlap {overlap}: {stats['num_preemptions']} preemptions, {stats['dispatch']}")
        assert stats["num_preemptions"] > 0
        assert stats["dispatch"]["paths"]["full"] > 0  # decode steps sampled in the graph
    off, on = results[False], results[True]
    for request_id in ("r0", "r1", "r2", "r3", "r5"):
        assert on[request_id] == off[request_id], request_id
        tokens, streamed, _ = on[request_id]
        assert streamed == tokens  # nothing past a stop reached the user
    assert on["r0"][0] == baseline["r0"][0]
    stop_at = baseline["r1"][0].index(stop_token)
    assert on["r1"][0] == baseline["r1"][0][: stop_at + 1] and on["r1"][2] == "stop"
    assert len(on["r2"][0]) == 7 and len(on["r5"][0]) == 1
    # The aborted request: what it streamed is a prefix of its free run, finished "abort".
    tokens, streamed, reason = on["r4"]
    assert reason == "abort" and streamed == tokens == baseline["r4"][0][: len(tokens)]
