"""Fused kernels on CUDA in bf16: each against the PyTorch ops it replaces, and a whole model
forward with and without them."""

from __future__ import annotations

import torch

from tesela.config import RopeScaling
from tesela.core.forward_batch import ForwardBatch
from tesela.engine.llm_engine import make_engine_config
from tesela.executor.model_runner import ModelRunner
from tesela.layers import fused
from tesela.layers.norm import RMSNorm
from tesela.layers.rotary import RotaryEmbedding


def reference(fn, *args):
    fused.set_fused_enabled(False)
    try:
        return fn(*args)
    finally:
        fused.set_fused_enabled(True)


def test_kernels_match_the_ops_they_replace():
    torch.manual_seed(0)
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    norm = RMSNorm(2048, 1e-5).to(**bf16)
    norm.weight.data.uniform_(0.5, 1.5)
    x, residual = torch.randn(33, 2048, **bf16) * 4, torch.randn(33, 2048, **bf16) * 4
    got, got_residual = norm.add_and_norm(x, residual)
    expected, expected_residual = reference(norm.add_and_norm, x, residual)
    assert torch.equal(got_residual, expected_residual)
    # One bf16 step at most (fp32 summation order differs): 2^-7 relative.
    torch.testing.assert_close(got.float(), expected.float(), rtol=8e-3, atol=1e-2)
    rotary = RotaryEmbedding(128, 4096, 1e6, RopeScaling())
    rotary.init_cache("cuda")
    qkv = torch.randn(33, 24 * 128, **bf16)
    q, k = qkv[:, : 16 * 128].view(33, 16, 128), qkv[:, 16 * 128 : 20 * 128].view(33, 4, 128)
    positions = torch.randint(0, 4096, (33,), device="cuda")
    for got, expected in zip(
        rotary(positions, q, k), reference(rotary, positions, q, k), strict=True
    ):
        # Bit-equal in Triton's interpreter; on H200 a few elements land one bf16 step apart.
        torch.testing.assert_close(got.float(), expected.float(), rtol=8e-3, atol=1e-2)
    gate_up = torch.randn(33, 2 * 3072, **bf16) * 3
    gate, up = gate_up.split(3072, dim=-1)
    torch.testing.assert_close(
        fused.silu_and_mul(gate_up).float(),
        (torch.nn.functional.silu(gate) * up).float(),
        rtol=8e-3,
        atol=1e-2,
    )


def test_model_forward_with_and_without_fusion():
    config, path = make_engine_config(
        "qwen3-0.6b", dtype="bfloat16", device="cuda", num_kv_tokens=4096, disable_cuda_graph=True
    )
    runner = ModelRunner(config, path)
    tokens = torch.randint(0, 151936, (300,)).tolist()

    def logits():
        batch = ForwardBatch.build(
            token_ids=[tokens],
            prefix_lens=[0],
            block_tables=[list(range(1, 21))],
            block_size=16,
            device="cuda",
        )
        batch.logits_indices = torch.arange(300, device="cuda")
        return runner.forward(batch).float()

    fused_logits = logits()
    plain_logits = reference(logits)
    error = (fused_logits - plain_logits).norm() / plain_logits.norm()
    assert error < 2e-2, f"relative error {error:.3g}"
    agree = (fused_logits.argmax(-1) == plain_logits.argmax(-1)).float().mean()
    assert agree > 0.95
