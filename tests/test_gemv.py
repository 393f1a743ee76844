"""The small-M linear kernel against F.linear in Triton's interpreter, and its dispatch table.

On a GPU the same kernel runs every tuned shape in bf16 (tests/gpu/test_fused_gpu.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from tesela.core.scratch import SPLIT_K_ARRIVALS
from tesela.layers import gemv

interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (set by .ci/run)"
)
CONFIGS = [
    dict(block_n=8, block_k=32, use_dot=False, num_warps=4, num_stages=2),
    dict(block_n=16, block_k=64, use_dot=True, num_warps=4, num_stages=2),
    # the whole of K in one (masked) tile: every weight load comes before the PDL wait
    dict(block_n=2, block_k=128, use_dot=False, num_warps=4, num_stages=2),
]


@interpreted
@pytest.mark.parametrize("config", CONFIGS, ids=["fma", "dot", "whole_k"])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_gemv_matches_linear(config, m):
    pytest.importorskip("triton")
    torch.manual_seed(m)
    dtype = torch.float16
    n, k = 45, 100  # neither a multiple of the blocks
    x = torch.randn(m, k, dtype=dtype)
    weight = torch.randn(n, k, dtype=dtype) / 10
    bias = torch.randn(n, dtype=dtype)
    for b in (None, bias):
        expected = F.linear(x.float(), weight.float(), None if b is None else b.float())
        got = gemv.gemv(x, weight, b, config)
        # fp32 accumulation in another order, then one rounding to fp16.
        torch.testing.assert_close(got.float(), expected, rtol=2e-3, atol=2e-3)


@interpreted
def test_gemv_rows_do_not_depend_on_the_batch():
    """No split-K and a fixed K order: a token's output is the same alone or in a batch."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    x = torch.randn(5, 64)
    weight = torch.randn(24, 64)
    alone = gemv.gemv(x[2:3], weight, None, CONFIGS[0])
    together = gemv.gemv(x, weight, None, CONFIGS[0])
    assert torch.equal(alone[0], together[2])


def test_gemv_refuses_a_large_batch():
    with pytest.raises(ValueError, match="gemv serves"):
        gemv.gemv(torch.zeros(17, 8), torch.zeros(4, 8), None, CONFIGS[0])


def test_table_is_read_by_device_dtype_shape_and_bucket(tmp_path):
    path = tmp_path / "table.json"
    shapes = {"4096,1024": {"1": CONFIGS[0]}}
    path.write_text(json.dumps({"GPU X": {"bfloat16": {"none": shapes, "norm": shapes}}}))
    table = gemv._device_table("GPU X", "bfloat16", path)
    assert table == {("none", 4096, 1024, 1): CONFIGS[0], ("norm", 4096, 1024, 1): CONFIGS[0]}
    assert gemv._device_table("GPU Y", "bfloat16", path) == {}
    assert gemv._device_table("GPU X", "float16", path) == {}
    assert [gemv.m_bucket(m) for m in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]


def test_checked_in_table_holds_valid_configs():
    """Every entry names a shape, a bucket and a full kernel config (no silent defaults)."""
    if not gemv.TABLE_PATH.is_file():
        pytest.skip("no tuned table checked in")
    table = json.loads(gemv.TABLE_PATH.read_text())
    keys = {"block_n", "block_k", "use_dot", "num_warps", "num_stages"}
    for dtypes in table.values():
        for prologues in dtypes.values():
            assert set(prologues) <= set(gemv.PROLOGUES)
            for shape, buckets in (item for p in prologues.values() for item in p.items()):
                assert len(shape.split(",")) == 2
                for bucket, config in buckets.items():
                    assert int(bucket) in gemv.M_BUCKETS
                    assert keys <= set(config)


@interpreted
@pytest.mark.parametrize("config", CONFIGS, ids=["fma", "dot", "whole_k"])
def test_silu_prologue_matches_silu_mul_then_linear(config):
    pytest.importorskip("triton")
    from tesela.layers import fused

    torch.manual_seed(7)
    gate_up = torch.randn(3, 2 * 72, dtype=torch.float16) * 2
    weight = torch.randn(40, 72, dtype=torch.float16) / 8
    expected = F.linear(fused.silu_and_mul(gate_up).float(), weight.float())
    got = gemv.gemv_silu(gate_up, weight, None, config)
    torch.testing.assert_close(got.float(), expected, rtol=2e-3, atol=2e-3)


@interpreted
@pytest.mark.parametrize("config", CONFIGS, ids=["fma", "dot", "whole_k"])
@pytest.mark.parametrize("with_residual", [True, False])
def test_norm_prologue_matches_add_norm_then_linear(config, with_residual):
    pytest.importorskip("triton")
    from tesela.layers.norm import RMSNorm

    torch.manual_seed(8)
    dtype = torch.float16
    x, residual = torch.randn(3, 80, dtype=dtype) * 2, torch.randn(3, 80, dtype=dtype) * 2
    norm = RMSNorm(80, 1e-6).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    weight, bias = torch.randn(40, 80, dtype=dtype) / 8, torch.randn(40, dtype=dtype)
    if with_residual:
        normed, expected_residual = norm.add_and_norm(x, residual)
    else:
        normed, expected_residual, residual = norm(x), x, None
    expected = F.linear(normed.float(), weight.float(), bias.float())
    got, new_residual = gemv.gemv_norm(x, residual, norm.weight, 1e-6, weight, bias, config)
    assert torch.equal(new_residual, expected_residual)
    torch.testing.assert_close(got.float(), expected, rtol=3e-3, atol=3e-3)


def test_cpu_and_large_batches_use_the_unfused_ops():
    from tesela.layers.linear import Linear
    from tesela.layers.norm import RMSNorm

    x, weight = torch.randn(2, 8), torch.randn(4, 8)
    assert gemv.lookup(x, weight) is None  # CPU: no Triton kernels outside the interpreter
    assert torch.equal(gemv.linear(x, weight, None), F.linear(x, weight))
    norm, proj = RMSNorm(8, 1e-6), Linear(8, 4)
    proj.weight.data.normal_()
    residual = torch.randn(2, 8)
    out, new_residual = gemv.norm_linear(x, residual, norm, proj)
    assert torch.equal(new_residual, x + residual)
    assert torch.equal(out, proj(norm(x + residual)))


# The split kernel (plain GEMMs): tensor cores, K over `split_k` programs whose partials the
# last to arrive adds. K must be a multiple of split_k * block_k.
SPLIT_CONFIGS = [
    dict(block_n=16, block_k=32, use_dot=True, split_k=1, num_warps=4, num_stages=2),
    dict(block_n=16, block_k=32, use_dot=True, split_k=3, num_warps=4, num_stages=2),
]


@interpreted
@pytest.mark.parametrize("config", SPLIT_CONFIGS, ids=["one", "split3"])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_split_kernel_matches_linear(config, m):
    pytest.importorskip("triton")
    torch.manual_seed(m)
    dtype, n, k = torch.float16, 45, 192  # 45: not a multiple of block_n; 192 = 2 * 3 * 32
    weight, bias = torch.randn(n, k, dtype=dtype) / 8, torch.randn(n, dtype=dtype)
    x = torch.randn(m, k, dtype=dtype)
    for b in (None, bias):
        expected = F.linear(x.float(), weight.float(), None if b is None else b.float())
        got = gemv.gemv(x, weight, b, config)
        torch.testing.assert_close(got.float(), expected, rtol=3e-3, atol=3e-3)
        # each row tile's last program put its count back: the next launch starts from zero
        assert not SPLIT_K_ARRIVALS.get(x.device, 0).any()


@interpreted
def test_split_kernel_rows_do_not_depend_on_the_batch():
    """Partials summed in split order, one MMA row per token: alone or in a batch of the same
    bucket, a token's row is the same bits."""
    pytest.importorskip("triton")
    torch.manual_seed(1)
    x, weight = torch.randn(7, 96, dtype=torch.float16), torch.randn(40, 96, dtype=torch.float16)
    config = SPLIT_CONFIGS[1]
    together = gemv.gemv(x, weight, None, config)
    alone = gemv.gemv(x[4:6], weight, None, config)
    assert torch.equal(alone, together[4:6])


def test_split_kernel_refuses_a_k_it_cannot_split_evenly_and_prologues():
    with pytest.raises(ValueError, match="not a multiple of split_k"):
        gemv.gemv(torch.zeros(1, 100), torch.zeros(4, 100), None, SPLIT_CONFIGS[1])
    with pytest.raises(ValueError, match="no 'silu' prologue"):
        gemv.gemv_silu(torch.zeros(1, 192), torch.zeros(4, 96), None, SPLIT_CONFIGS[1])
