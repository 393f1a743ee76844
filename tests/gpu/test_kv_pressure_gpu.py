"""The engine under KV pressure on the GPU, with the default graphs (piecewise + FULL decode).

The case of issue 8: qwen3-0.6b with dummy weights, a 256-token KV pool, six prompts of 9-130
tokens, 120 new tokens each, ignore_eos, and token budgets of 1, 3 and 64. Preemption by
recompute then happens many times, and batches made only of recompute chunks occur. Greedy
tokens must equal those of a roomy pool and those of the same tight pool with graphs off;
every request must finish with 120 tokens and no KV block may stay allocated.

fp32 (with TF32 off, torch's default), so that the different batch compositions of the three
runs do not flip a greedy choice through bf16 rounding. Run with `-s` to see the preemption
counts and the dispatch paths of each budget.
"""

from __future__ import annotations

import pytest
import torch

from tesela import LLM, SamplingParams

LENGTHS = [9, 130, 33, 77, 18, 101]
PARAMS = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
TIGHT = dict(num_kv_tokens=256)


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(8)
    return [torch.randint(10, 30000, (n,), generator=generator).tolist() for n in LENGTHS]


def run(**kwargs):
    llm = LLM("qwen3-0.6b", load_format="dummy", dtype="float32", device="cuda", **kwargs)
    outputs = llm.generate(prompts(), PARAMS)
    return llm.engine, [o.token_ids for o in outputs], outputs


@pytest.fixture(scope="module")
def roomy_tokens():
    engine, tokens, _ = run(max_num_batched_tokens=64)
    assert engine.scheduler.num_preemptions == 0
    return tokens


@pytest.mark.parametrize("budget", [1, 3, 64])
def test_tight_pool_with_graphs_matches_roomy_pool_and_eager(roomy_tokens, budget):
    engine, tokens, outputs = run(max_num_batched_tokens=budget, **TIGHT)
    stats = engine.stats()
    print(
        f"\nbudget {budget}: {stats['num_preemptions']} preemptions, "
        f"dispatch {stats['dispatch']}, card {torch.cuda.get_device_name()}"
    )
    assert all(o.finished and len(o.token_ids) == PARAMS.max_tokens for o in outputs)
    assert engine.block_manager.num_used_blocks == 0
    assert tokens == roomy_tokens
    if budget > 1:  # a budget of one token runs one request at a time: nothing to preempt
        assert stats["num_preemptions"] >= 5
    assert stats["dispatch"]["paths"]["full"] > 0  # FULL decode graphs served decode steps
    eager_engine, eager_tokens, _ = run(
        max_num_batched_tokens=budget, disable_cuda_graph=True, **TIGHT
    )
    assert eager_engine.stats()["dispatch"]["paths"]["eager"] > 0
    assert eager_tokens == tokens
