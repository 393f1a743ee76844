"""The KV store fused into the q/k norm + rotary kernel on CUDA (qwen3-0.6b, bf16, Triton
attention): one launch fewer per layer, the same pool contents and outputs bit for bit as the
attention call's own store, and a breakable replay whose padding tokens store only the dummy
slot. The CPU checks are in tests/test_fused_kv_store.py."""

from __future__ import annotations

import pytest
import torch
from test_piecewise_gpu import random_batch

from tesela.core.kv_cache import DUMMY_SLOT
from tesela.engine.llm_engine import make_engine_config
from tesela.executor.model_runner import ModelRunner

SIZES = [8, 16, 32, 64]


@pytest.fixture(scope="module")
def runner():
    config, path = make_engine_config(
        "qwen3-0.6b",
        dtype="bfloat16",
        device="cuda",
        num_kv_tokens=8192,
        piecewise_cudagraph="breakable",
        capture_sizes=SIZES,
        full_mixed=False,
    )
    runner = ModelRunner(config, path)
    assert runner.attn_backend.fuses_kv_store
    return runner


def pools_at(runner, slots: torch.Tensor) -> list[torch.Tensor]:
    cache = runner.kv_cache
    return [pool[slots].clone() for pool in (*cache.k_buffers, *cache.v_buffers)]


def test_a_decoder_layer_launches_one_kernel_fewer(runner, monkeypatch):
    from tesela.bench.decode import launches_per_layer

    fused_store = launches_per_layer(runner)
    monkeypatch.setattr(type(runner.attn_backend), "fuses_kv_store", False)
    separate_store = launches_per_layer(runner)
    print(f"launches per layer: KV store in rotary {fused_store}, separate {separate_store}")
    assert separate_store - fused_store == 1


def test_pools_and_outputs_equal_the_attention_store_bitwise(runner, monkeypatch):
    rows = [(0, 40), (0, 7)]
    step = random_batch(rows, seed=1)
    fused_out = runner.forward_eager(random_batch(rows, seed=1)).clone()
    fused_pools = pools_at(runner, step.out_cache_loc)
    monkeypatch.setattr(type(runner.attn_backend), "fuses_kv_store", False)
    for pool in (*runner.kv_cache.k_buffers, *runner.kv_cache.v_buffers):
        pool[step.out_cache_loc] = 0
    plain_out = runner.forward_eager(random_batch(rows, seed=1))
    assert torch.equal(fused_out, plain_out)
    plain_pools = pools_at(runner, step.out_cache_loc)
    assert all(torch.equal(a, b) for a, b in zip(fused_pools, plain_pools, strict=True))


def test_breakable_padding_stores_only_the_dummy_slot(runner):
    piecewise = runner.piecewise
    piecewise.run(random_batch([(0, 30), (0, 29)], seed=2))  # 59 tokens: the 64 graph
    before = [pool.clone() for pool in runner.kv_cache.k_buffers]
    rows = [(0, 5), (0, 14)]  # 19 tokens: 13 padding tokens in the 32 graph
    small = random_batch(rows, seed=3)
    got = piecewise.run(random_batch(rows, seed=3)).clone()
    assert piecewise.buffers.out_cache_loc[19:32].tolist() == [DUMMY_SLOT] * 13
    changed = set()
    for pool, old in zip(runner.kv_cache.k_buffers, before, strict=True):
        changed |= set((pool != old).any(dim=(1, 2)).nonzero().flatten().tolist())
    assert changed <= set(small.out_cache_loc.tolist()) | {DUMMY_SLOT}
    assert changed >= set(small.out_cache_loc.tolist())
    stored = pools_at(runner, small.out_cache_loc)
    assert torch.equal(got, piecewise.run_eager_padded(random_batch(rows, seed=3)))
    again = pools_at(runner, small.out_cache_loc)
    assert all(torch.equal(a, b) for a, b in zip(stored, again, strict=True))
