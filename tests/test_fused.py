"""Fused Triton kernels against the PyTorch ops they replace, in Triton's interpreter.

CI exports TRITON_INTERPRET=1; on a GPU the same checks run in bf16 (tests/gpu/test_fused_gpu.py).
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (set by .ci/run)", allow_module_level=True)
pytest.importorskip("triton")

from tesela.config import RopeScaling  # noqa: E402
from tesela.layers import fused  # noqa: E402
from tesela.layers.norm import RMSNorm  # noqa: E402
from tesela.layers.rotary import RotaryEmbedding  # noqa: E402

DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_and_without_residual(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-6).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    x, residual = torch.randn(7, 96, dtype=dtype), torch.randn(7, 96, dtype=dtype)
    got, _ = fused.rms_norm(x, norm.weight, 1e-6)
    torch.testing.assert_close(got, norm(x), rtol=1e-5, atol=1e-5)
    got, new_residual = fused.rms_norm(x, norm.weight, 1e-6, residual)
    expected, expected_residual = norm.add_and_norm(x, residual)
    assert torch.equal(new_residual, expected_residual)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_head_norm_on_a_strided_view(dtype):
    torch.manual_seed(1)
    qkv = torch.randn(5, 4 * 16 + 2 * 2 * 16, dtype=dtype)
    q = qkv[:, : 4 * 16].view(5, 4, 16)  # rows strided, as a q slice of a fused qkv
    norm = RMSNorm(16, 1e-6).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    got, _ = fused.rms_norm(q, norm.weight, 1e-6)
    torch.testing.assert_close(got, norm(q), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_bit_for_bit(dtype):
    torch.manual_seed(2)
    rotary = RotaryEmbedding(32, 256, 10000.0, RopeScaling())
    rotary.init_cache("cpu")
    qkv = torch.randn(6, 3 * 2 * 32, dtype=dtype)
    q = qkv[:, : 2 * 32].view(6, 2, 32)
    k = qkv[:, 2 * 32 : 4 * 32].view(6, 2, 32)
    positions = torch.tensor([0, 1, 7, 100, 255, 3])
    expected_q, expected_k = rotary(positions, q, k)
    assert torch.equal(fused.rotary(q, positions, rotary.cos_sin_cache), expected_q)
    assert torch.equal(fused.rotary(k, positions, rotary.cos_sin_cache), expected_k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    torch.manual_seed(3)
    gate_up = torch.randn(5, 2 * 1100, dtype=dtype)  # crosses a 1024-wide block
    gate, up = gate_up.split(1100, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    # exp differs between libraries in its last bit: one rounding step of the dtype at most.
    tolerance = 1e-6 if dtype is torch.float32 else 1e-3
    torch.testing.assert_close(
        fused.silu_and_mul(gate_up), expected, rtol=tolerance, atol=tolerance
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 32), (44, 8, 64)])
def test_qk_norm_rope_matches_norm_then_rotary(dtype, qk_norm, heads, kv_heads, dim):
    """One launch for q/k norm + rotary equals the two separate steps it replaces. 44 + 8
    heads of 64 take seven programs of QK_HEADS = 8 heads per token, the sixth holding q's
    last heads and k's first; 4 + 2 take one, with two rows masked."""
    torch.manual_seed(4)
    tokens = 6
    rotary = RotaryEmbedding(dim, 256, 10000.0, RopeScaling())
    rotary.init_cache("cpu")
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype) * 3
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    positions = torch.tensor([0, 1, 7, 100, 255, 3])
    weights = None
    if qk_norm:
        q_norm, k_norm = RMSNorm(dim, 1e-6).to(dtype), RMSNorm(dim, 1e-6).to(dtype)
        q_norm.weight.data.uniform_(0.5, 1.5)
        k_norm.weight.data.uniform_(0.5, 1.5)
        q, k = fused.rms_norm(q, q_norm.weight, 1e-6)[0], fused.rms_norm(k, k_norm.weight, 1e-6)[0]
        weights = (q_norm.weight, k_norm.weight)
    expected_q, expected_k = rotary(positions, q, k)
    got_q, got_k = fused.qk_norm_rope(
        qkv, positions, rotary.cos_sin_cache, heads, kv_heads, weights, 1e-6
    )
    assert got_q.shape == expected_q.shape and got_k.shape == expected_k.shape
    # The norm sums its two halves separately: one rounding step of the dtype at most.
    tolerance = 1e-5 if dtype is torch.float32 else 2e-3
    torch.testing.assert_close(got_q, expected_q, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(got_k, expected_k, rtol=tolerance, atol=tolerance)
