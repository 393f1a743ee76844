"""The KV store fused into the q/k norm + rotary kernel, on every path (CPU, Triton interpreter).

With a backend that reads new K/V from the pool only (`fuses_kv_store`: the Triton backend),
each layer's rotary kernel writes the rotated K and the V into the pool at the slots of the
forward's batch (`kv_store_target`) and attention skips its own store: one launch fewer per
layer, and a breakable split call of one launch. Inside graphs the slots are the static
buffers', so a replay stores the replayed batch and its padding tokens hit only the dummy slot.
Breakable pieces record the fused kernels as their `tesela::` custom ops here (the CPU stand-in
replays ATen ops; tesela/core/recording.py). The same checks on CUDA:
tests/gpu/test_fused_kv_store_gpu.py.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (set by .ci/run)", allow_module_level=True)
pytest.importorskip("triton")

from test_dispatcher import batch  # noqa: E402  (rows on their own 16-token blocks)

from tesela.core.forward_context import forward_context  # noqa: E402
from tesela.core.kv_cache import DUMMY_SLOT, KVCachePool, KVStoreTarget, pool_pointers  # noqa: E402
from tesela.engine.llm_engine import make_engine_config  # noqa: E402
from tesela.executor.dispatcher import RunPath  # noqa: E402
from tesela.executor.model_runner import ModelRunner  # noqa: E402
from tesela.layers import fused  # noqa: E402

SIZES = (8, 32)


@pytest.fixture(scope="module")
def runner():
    from tesela.attention.triton_backend import TritonAttentionBackend, TritonAttentionConfig

    fused.set_fused_enabled(True, on_cpu=True)
    try:
        config, path = make_engine_config(
            "tiny", piecewise_cudagraph="breakable", capture_sizes=list(SIZES), num_kv_tokens=2048
        )
        runner = ModelRunner(dataclasses.replace(config, attention_backend="triton"), path)
        assert isinstance(runner.attn_backend, TritonAttentionBackend)
        runner.attn_backend.config = TritonAttentionConfig(block_m=16, block_n=16)
        runner.add_full_decode((1, 2, 4), max_model_len=256)
        runner.add_full_mixed(SIZES, max_rows=4, max_model_len=256)
        yield runner
    finally:
        fused.set_fused_enabled(True)


def pools_at(runner, slots: torch.Tensor) -> list[torch.Tensor]:
    cache = runner.kv_cache
    return [pool[slots].clone() for pool in (*cache.k_buffers, *cache.v_buffers)]


def test_the_rotary_kernel_stores_kv_as_the_attention_store_would():
    from tesela.attention.triton_kernels.store_kv import store_kv

    heads, kv_heads, dim, tokens = 4, 2, 16, 6
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=generator)
    positions = torch.tensor([5, 6, 7, 0, 1, 2])
    cache = torch.rand(2, 16, dim, generator=generator)  # any cos/sin table
    norms = (torch.rand(dim, generator=generator) + 0.5, torch.rand(dim, generator=generator))
    slots = torch.tensor([17, 3, 40, 41])  # the last two tokens have no slot: not stored
    shape = (64, kv_heads, dim)
    fused.set_fused_enabled(True, on_cpu=True)
    try:
        args = (qkv, positions, cache, heads, kv_heads, norms, 1e-6)
        pools = (torch.zeros(shape), torch.zeros(shape))  # layer 1 of a two-layer table
        pointers = torch.tensor([[0, 0], [pools[0].data_ptr(), pools[1].data_ptr()]])
        q, k = fused.qk_norm_rope(*args, kv_store=KVStoreTarget(pointers, 1, slots))
        q_plain, k_plain = fused.qk_norm_rope(*args)
        k_pool, v_pool = torch.zeros(shape), torch.zeros(shape)
        v = qkv[:, (heads + kv_heads) * dim :]
        store_kv(k_plain[:4], v[:4], k_pool, v_pool, slots)
    finally:
        fused.set_fused_enabled(True)
    assert torch.equal(q, q_plain) and torch.equal(k, k_plain)
    assert torch.equal(pools[0], k_pool) and torch.equal(pools[1], v_pool)
    assert pools[0].abs().sum(dim=(1, 2)).nonzero().flatten().tolist() == [3, 17, 40, 41]


def test_layers_store_in_the_rotary_kernel_and_attention_skips_its_store(runner):
    backend = runner.attn_backend
    step = batch([(0, 5), (9, 1)])
    target = backend.kv_store_target(1, step)
    assert target.layer == 1 and target.slots is step.out_cache_loc
    # The table holds the real pool's addresses: startup rewrote it when it sized the pool.
    assert torch.equal(target.pointers, pool_pointers(runner.kv_cache))
    # Every breakable split call was recorded with kv_stored, so its replay skips the store.
    graph = runner.piecewise.captured[SIZES[0]]
    assert [call.args for call in graph.splits] == [(0, True), (1, True)]


ROWS = [(9, 1), (0, 7), (20, 6), (30, 1)]  # decode rows, a first chunk, a later chunk


def test_a_backend_that_stores_itself_gets_no_target_and_the_same_pools(runner, monkeypatch):
    """`fuses_kv_store` decides: off, no layer stores K/V before attention, and attention's own
    store leaves the pools and outputs as the rotary kernel's did."""
    runner.forward_eager(batch([(0, p or 1) for p, _ in ROWS], seed=1))  # the cached prefixes
    step = batch(ROWS, seed=2)
    fused_out = runner.forward_eager(batch(ROWS, seed=2)).clone()
    fused_pools = pools_at(runner, step.out_cache_loc)
    monkeypatch.setattr(type(runner.attn_backend), "fuses_kv_store", False)
    assert runner.attn_backend.kv_store_target(1, step) is None
    for pool in (*runner.kv_cache.k_buffers, *runner.kv_cache.v_buffers):
        pool[step.out_cache_loc] = 0.0
    assert torch.equal(runner.forward_eager(batch(ROWS, seed=2)), fused_out)
    assert all(
        torch.equal(a, b)
        for a, b in zip(pools_at(runner, step.out_cache_loc), fused_pools, strict=True)
    )


@pytest.mark.parametrize("kind", ["bound split call", "forward"])
def test_attention_told_kv_stored_leaves_the_pool_alone(runner, kind):
    """Attention given garbage K/V with kv_stored=True must not write them."""
    backend = runner.attn_backend
    step = batch([(0, 5), (9, 1)], seed=3)
    layout = runner.layout
    n = step.num_tokens
    q = torch.randn(n, layout.num_heads * layout.head_dim)
    garbage = torch.full((n, layout.num_kv_heads * layout.head_dim), 1e4)
    out = torch.empty_like(q)
    before = pools_at(runner, step.out_cache_loc)
    plan = runner.planner.plan(step)
    if kind == "forward":
        backend.forward(q, garbage, garbage, out, 0, step, plan.attn_metadata, kv_stored=True)
    else:
        call = backend.bind_split(q, garbage, garbage, out, 0, kv_stored=True)
        call(backend.prepare_split_replay(step, plan.attn_metadata))
    after = pools_at(runner, step.out_cache_loc)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize("path", [RunPath.PIECEWISE, RunPath.FULL_MIXED, RunPath.EAGER])
def test_each_path_stores_what_eager_stores(runner, path):
    runner.forward_eager(batch([(0, p or 1) for p, _ in ROWS], seed=1))  # the cached prefixes
    step = batch(ROWS, seed=2)
    expected = runner.forward_eager(batch(ROWS, seed=2)).clone()
    stored = pools_at(runner, step.out_cache_loc)
    for pool in (*runner.kv_cache.k_buffers, *runner.kv_cache.v_buffers):
        pool[step.out_cache_loc] = 0.0  # so a path that forgot to store would read zeros
    got = runner.dispatcher.runner(path).run(batch(ROWS, seed=2))
    assert all(
        torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        for a, b in zip(pools_at(runner, step.out_cache_loc), stored, strict=True)
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_full_decode_replay_stores_the_replayed_rows(runner):
    rows = [(9, 1), (12, 1), (30, 1)]  # 3 rows: the 4-row graph, one padding row
    runner.forward_eager(batch([(0, 9), (0, 12), (0, 30)], seed=4))
    step = batch(rows, seed=5)
    assert runner.dispatcher.choose(step) == (RunPath.FULL_DECODE, None)
    expected = runner.forward_eager(batch(rows, seed=5)).clone()
    stored = pools_at(runner, step.out_cache_loc)
    for pool in (*runner.kv_cache.k_buffers, *runner.kv_cache.v_buffers):
        pool[step.out_cache_loc] = 0.0
    got = runner.dispatcher.run(batch(rows, seed=5))
    assert all(
        torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        for a, b in zip(pools_at(runner, step.out_cache_loc), stored, strict=True)
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_binding_a_new_pool_rewrites_the_pointer_table_in_place(runner):
    """Piecewise graphs are captured on the provisional pool and read the table's address:
    binding the sized pool must rewrite the same table, never allocate a new one."""
    from tesela.attention.triton_backend import TritonAttentionBackend

    def pool(blocks: int) -> KVCachePool:
        layout = runner.layout
        return KVCachePool(
            num_layers=2, num_blocks=blocks, block_size=16, num_kv_heads=layout.num_kv_heads,
            head_dim=layout.head_dim, dtype=layout.dtype, device="cpu",
        )  # fmt: skip

    backend = TritonAttentionBackend(runner.layout, pool(2))
    table = backend.kv_store_target(0, batch([(0, 3)])).pointers
    address = table.data_ptr()
    sized = pool(8)
    backend.bind_kv_pool(sized)
    assert table.data_ptr() == address
    assert torch.equal(table, pool_pointers(sized))
    assert backend.kv_store_target(0, batch([(0, 3)])).pointers is table


def test_breakable_padding_stores_only_the_dummy_slot(runner):
    """The pieces were captured on the provisional pool: their rotary kernels reach the sized
    pool through the rewritten address table, and padding tokens write the dummy slot only."""
    piecewise = runner.piecewise
    piecewise.run(batch([(0, 9), (0, 12), (0, 5), (0, 3)], seed=6))  # 29 tokens: the 32 graph
    before = [pool.clone() for pool in runner.kv_cache.k_buffers]
    rows = [(0, 5), (0, 14)]  # 19 tokens: 13 padding tokens
    small = batch(rows, seed=7)
    got = piecewise.run(batch(rows, seed=7)).clone()
    assert piecewise.buffers.out_cache_loc[19:32].tolist() == [DUMMY_SLOT] * 13
    changed = set()
    for pool, old in zip(runner.kv_cache.k_buffers, before, strict=True):
        changed |= set((pool != old).any(dim=(1, 2)).nonzero().flatten().tolist())
    assert (
        set(small.out_cache_loc.tolist())
        <= changed
        <= set(small.out_cache_loc.tolist()) | {DUMMY_SLOT}
    )
    stored = pools_at(runner, small.out_cache_loc)
    assert torch.equal(got, piecewise.run_eager_padded(batch(rows, seed=7)))
    again = pools_at(runner, small.out_cache_loc)
    assert all(torch.equal(a, b) for a, b in zip(stored, again, strict=True))


def test_the_torch_backend_keeps_its_own_store(runner):
    from tesela.attention.torch_backend import TorchAttentionBackend

    torch_backend = TorchAttentionBackend(runner.layout, runner.kv_cache)
    assert torch_backend.kv_store_target(0, batch([(0, 3)])) is None
    step = batch([(0, 3)])
    with forward_context(step, runner.planner.plan(step), torch_backend):
        from tesela.attention.op import kv_store_target

        assert kv_store_target(0) is None
