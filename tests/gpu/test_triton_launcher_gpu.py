"""Cached Triton launchers on CUDA: the cached path launches the kernel Triton's own path would
pick and gives the same bits, and breakable replays through them equal the eager forward.

Every test runs with the launchers' debugging check on (TESELA_CHECK_LAUNCHERS semantics:
each cached launch asks `JITFunction`'s cache which compiled kernel it would launch for the same
arguments and raises if it is another one), over arguments that move every specialization:
dtypes, misaligned tensors, strides divisible by 16 or not, block tables one column wide.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from test_piecewise_gpu import random_batch  # noqa: E402

from tesela.attention.base import AttentionLayout  # noqa: E402
from tesela.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from tesela.attention.triton_kernels import launcher  # noqa: E402
from tesela.attention.triton_kernels.decode_attention import STAGE1, STAGE2  # noqa: E402
from tesela.attention.triton_kernels.extend_attention import EXTEND  # noqa: E402
from tesela.attention.triton_kernels.store_kv import STORE_KV  # noqa: E402
from tesela.core.forward_batch import ForwardBatch  # noqa: E402
from tesela.core.kv_cache import KVCachePool  # noqa: E402
from tesela.engine.llm_engine import make_engine_config  # noqa: E402
from tesela.executor.model_runner import ModelRunner  # noqa: E402

DEVICE = torch.device("cuda")
LAUNCHERS = (STORE_KV, EXTEND, STAGE1, STAGE2)


@pytest.fixture
def checked_launchers(monkeypatch):
    """Launchers with no cached handle, whose cached launches are checked against Triton."""
    monkeypatch.setattr(launcher, "CHECK_LAUNCHERS", True)
    for each in LAUNCHERS:
        each.clear()
    yield
    for each in LAUNCHERS:
        each.clear()  # drop the checking handles


def backend_for(dtype, block_size=16, num_blocks=64, head_dim=128):
    layout = AttentionLayout(8, 2, head_dim, head_dim**-0.5, dtype, DEVICE)
    pool = KVCachePool(
        num_layers=1, num_blocks=num_blocks, block_size=block_size, num_kv_heads=2,
        head_dim=head_dim, dtype=dtype, device=DEVICE,
    )  # fmt: skip
    for buffer in (*pool.k_buffers, *pool.v_buffers):
        buffer.normal_()
    return TritonAttentionBackend(layout, pool)


def batch_for(rows, block_size=16):
    """rows: (prefix_len, new_tokens)."""
    tokens, tables, next_block = [], [], 1
    for prefix, n in rows:
        tokens.append([1] * n)
        blocks = -(-(prefix + n) // block_size)
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    return ForwardBatch.build(
        token_ids=tokens,
        prefix_lens=[p for p, _ in rows],
        block_tables=tables,
        block_size=block_size,
        device=DEVICE,
    )


def qkv(num_tokens, dtype, offset):
    """q, k, v as column slices of one fused buffer starting `offset` elements in (misaligned
    pointers when offset % 8 != 0 for half types)."""
    width = (8 + 2 + 2) * 128
    flat = torch.randn(offset + num_tokens * width, device=DEVICE, dtype=dtype)
    fused = flat[offset:].view(num_tokens, width)
    return fused[:, :1024], fused[:, 1024:1280], fused[:, 1280:]


def run(backend, rows, dtype, offset):
    batch = batch_for(rows)
    q, k, v = qkv(batch.num_tokens, dtype, offset)
    out = torch.full_like(q, float("nan"))
    pool = backend.kv_cache
    backend.forward(q, k, v, out, 0, batch, backend.plan(batch))
    torch.cuda.synchronize()
    return out, pool.k_buffers[0].clone()


CASES = {
    "extend": [(0, 37), (20, 64), (3, 1)],
    "extend-one-row-one-block": [(0, 9)],
    "decode": [(40, 1), (300, 1), (7, 1)],
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("offset", [0, 1, 16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_launch_equals_jit_launch_bitwise(
    checked_launchers, monkeypatch, case, dtype, offset
):
    rows = CASES[case]
    torch.manual_seed(0)
    jit = backend_for(dtype)
    for each in LAUNCHERS:  # the plain kernel[grid] path, as before cached launchers
        monkeypatch.setattr(each, "fallback_reason", "test: JIT path")
    torch.manual_seed(1)
    expected = run(jit, rows, dtype, offset)
    for each in LAUNCHERS:
        monkeypatch.setattr(each, "fallback_reason", None)
    for attempt in range(3):  # the first launch of each key caches it, the next ones reuse it
        torch.manual_seed(0)
        cached = backend_for(dtype)
        torch.manual_seed(1)
        got = run(cached, rows, dtype, offset)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), attempt
    assert STORE_KV.cached_keys > 0
    assert (EXTEND if case != "decode" else STAGE1).cached_keys > 0


@pytest.fixture(scope="module")
def runner():
    config, path = make_engine_config(
        "qwen3-0.6b",
        dtype="bfloat16",
        device="cuda",
        num_kv_tokens=8192,
        piecewise_cudagraph="breakable",
        capture_sizes=[4, 16, 64, 256],
        full_mixed=False,  # piecewise.run is called directly: decode batches replay it too
    )
    return ModelRunner(config, path)


@pytest.mark.parametrize(
    "rows",
    [[(0, 3)], [(0, 16)], [(0, 200)], [(0, 7), (33, 1), (16, 20), (5, 1)], [(40, 1)] * 9],
    ids=["n3", "n16", "n200", "mixed", "decode9"],
)
def test_breakable_replay_through_cached_launchers_equals_eager(checked_launchers, runner, rows):
    piecewise = runner.piecewise
    for seed in range(3):  # the first replay caches the handles, the next ones use them
        expected = piecewise.run_eager_padded(random_batch(rows, seed))
        got = piecewise.run(random_batch(rows, seed)).clone()
        assert torch.equal(got, expected), seed
    attention = (EXTEND, STAGE1)
    assert all(each.fallback_reason is None for each in attention)
    assert sum(each.cached_keys for each in attention) > 0
    # The rotary kernel stores K and V (the backend fuses the KV store): no store launch.
    assert STORE_KV.cached_keys == 0
    seconds = piecewise.split_host_seconds(random_batch(rows, 0))
    print(f"host us per split (checked launchers: slower than served): {seconds * 1e6:.1f}")


def test_checked_launch_refuses_a_group_whose_tensor_moved(checked_launchers):
    """Cached launches pass the addresses a group recorded when it was made; a tensor given a
    new storage afterwards would be written at its old address. The debugging check says so."""
    from tesela.attention.triton_kernels.launcher import (
        CachedLauncher,
        constexpr_args,
        runtime_args,
    )
    from tesela.attention.triton_kernels.store_kv import _store_kv_kernel

    fresh = CachedLauncher(_store_kv_kernel)
    k, v = (torch.randn(4, 32, device=DEVICE) for _ in range(2))
    k_pool, v_pool = (torch.zeros(16, 2, 16, device=DEVICE) for _ in range(2))
    loc = torch.tensor([3, 5, 7, 9], device=DEVICE)
    groups = (
        runtime_args(k, v, k.stride(0), v.stride(0)),
        runtime_args(k_pool, v_pool, k_pool.stride(0)),
        runtime_args(loc),
        constexpr_args(32, 32),
    )
    for _ in range(2):  # the first launch caches the handle, the second takes it
        fresh((4, 1, 1), (4, 3), *groups, num_tokens=4)
    torch.cuda.synchronize()
    assert fresh.cached_keys == 1
    assert torch.equal(k_pool[loc].view(4, 32), k) and torch.equal(v_pool[loc].view(4, 32), v)
    k_pool.set_(torch.zeros_like(k_pool))
    with pytest.raises(RuntimeError, match="moved"):
        fresh((4, 1, 1), (4, 3), *groups, num_tokens=4)
