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
import subprocess
import sys
from pathlib import Path

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

from test_prefix_cache_engine import run, shared_prefix_workload, tokens  # noqa: E402

from tesela.attention.triton_kernels.extend_attention import kernels_interpreted  # noqa: E402
from tesela.engine.llm_engine import LLMEngine, make_engine_config  # noqa: E402

INTERPRETED_HERE = kernels_interpreted()


def test_in_a_fresh_interpreter_process():
    if INTERPRETED_HERE:
        pytest.skip("the kernel tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(command, env=env, cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


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
