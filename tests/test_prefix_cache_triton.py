"""Prefix caching through the Triton attention kernels, on CPU under the Triton interpreter.

The engine runs the `tiny` model with the Triton backend (forced past the policy, which keeps
Triton for CUDA): rows that start at a cached prefix are extend rows with prefix > 0 whose
block tables share blocks with other rows, and decode rows read shared blocks. Greedy outputs
must equal the cache-off run of the torch reference backend. As in
tests/test_triton_attention.py, TRITON_INTERPRET=1 must be set before triton is imported, so
when triton is already loaded without it, the module reruns itself in a fresh process; on CUDA
machines it skips (tests/gpu/test_prefix_cache_gpu.py covers the compiled kernels).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip(
        "CUDA machine: tests/gpu/test_prefix_cache_gpu.py runs the compiled kernels",
        allow_module_level=True,
    )
if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from interpreter import rerun_under_interpreter
from test_prefix_cache_engine import (  # noqa: E402
    Arrival,
    Workload,
    run,
    shared_prefix_workload,
    tokens,
)

from tesela import SamplingParams  # noqa: E402
from tesela.attention.triton_kernels.extend_attention import kernels_interpreted  # noqa: E402
from tesela.engine.llm_engine import LLMEngine, make_engine_config  # noqa: E402

INTERPRETED_HERE = kernels_interpreted()


def test_in_a_fresh_interpreter_process():
    if INTERPRETED_HERE:
        pytest.skip("the kernel tests run in this process")
    rerun_under_interpreter(__file__)


def triton_engine(**kwargs) -> LLMEngine:
    config, path = make_engine_config("tiny", block_size=4, **kwargs)
    return LLMEngine(config.replace(attention_backend="triton"), path)


@pytest.mark.skipif(not INTERPRETED_HERE, reason="runs in the fresh interpreter process")
def test_triton_cached_prefixes_match_the_torch_backend_without_cache():
    workload = shared_prefix_workload(seed=7)
    workload.waves = workload.waves[:2]
    # A small pool and token budget: chunks, preemption and eviction all happen.
    limits = dict(num_kv_tokens=16 * 4, max_num_batched_tokens=16)
    _, off = run(workload, enable_prefix_caching=False, **limits)
    engine, on = run(workload, engine=triton_engine(**limits))
    assert engine.runner.attn_backend.name == "triton"
    assert tokens(on) == tokens(off)
    assert engine.stats()["prefix_cache_hit_tokens"] > 0
    assert engine.scheduler.num_preemptions > 0


@pytest.mark.skipif(not INTERPRETED_HERE, reason="runs in the fresh interpreter process")
def test_triton_recompute_past_the_prompt_from_the_cache_matches():
    """Preempted after generating, the request comes back with a cached prefix that reaches
    past its prompt: its row brings several tokens and must run the extend kernel."""
    prompt = [5, 6, 7]
    expected = run(Workload([[Arrival(prompt, 16)]]), enable_prefix_caching=False)[1]
    engine = triton_engine()
    engine.add_request(prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), "a")
    outputs = engine.step()
    request = engine.scheduler.running[0]
    while request.num_tokens < 15:
        outputs = engine.step()
    engine.scheduler._preempt(request)
    while engine.has_unfinished():
        outputs = engine.step()
    assert outputs[0].token_ids == expected["w0-0"].token_ids
    assert outputs[0].num_cached_tokens == 0 and request.num_preemptions == 1
