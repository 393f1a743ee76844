"""Fused kernels on CUDA in bf16: each against the PyTorch ops it replaces, and a whole model
forward with and without them."""

from __future__ import annotations

import torch

from tesela.config import RopeScaling
from tesela.core.forward_batch import ForwardBatch
from tesela.core.scratch import SPLIT_K_ARRIVALS
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
        "qwen3-0.6b", dtype="bfloat16", device="cuda", num_kv_tokens=4096, disable_cudagraph=True
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


def test_qk_norm_rope_matches_norm_then_rotary():
    torch.manual_seed(5)
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    rotary = RotaryEmbedding(128, 4096, 1e6, RopeScaling())
    rotary.init_cache("cuda")
    qkv = torch.randn(33, 32 * 128, **bf16) * 3
    q, k = qkv[:, : 16 * 128].view(33, 16, 128), qkv[:, 16 * 128 : 24 * 128].view(33, 8, 128)
    positions = torch.randint(0, 4096, (33,), device="cuda")
    norms = [RMSNorm(128, 1e-6).to(**bf16) for _ in range(2)]
    for norm in norms:
        norm.weight.data.uniform_(0.5, 1.5)
    expected = reference(lambda: rotary(positions, norms[0](q), norms[1](k)))
    weights = (norms[0].weight, norms[1].weight)
    got = fused.qk_norm_rope(qkv, positions, rotary.cos_sin_cache, 16, 8, weights, 1e-6)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.float(), e.float(), rtol=8e-3, atol=1e-2)


def test_every_tuned_gemv_entry_matches_the_unfused_path():
    """Each (prologue, N, K, M bucket) the table sends to Triton on this GPU, through the
    model's dispatch, against the separate kernel + cuBLAS."""
    from tesela.layers import gemv
    from tesela.tune.gemv import Case

    table = gemv._device_table(torch.cuda.get_device_name(), "bfloat16")
    torch.manual_seed(6)
    for (prologue, n, k, bucket), config in sorted(table.items()):
        weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k**0.5
        case = Case(prologue, bucket, k, torch.bfloat16)
        assert gemv.lookup(case.x, weight, prologue) == config
        got, expected = case.triton(weight, config), case.unfused(weight, None)
        torch.testing.assert_close(got.float(), expected.float(), rtol=8e-3, atol=1.5e-2)


def test_split_gemv_launches_back_to_back_in_a_graph_equal_each_launch_alone():
    """The split kernel's arrival counts are shared by every launch on the device: under PDL
    the next launch starts while the last one finishes. 24 launches in a row in one CUDA graph
    (each on its own weight, M = 1 and 5) give each launch's bits alone, and leave every count
    at zero."""
    from tesela.layers import gemv

    config = dict(block_n=16, block_k=256, use_dot=True, split_k=8, num_warps=4, num_stages=4)
    torch.manual_seed(11)
    weights = [torch.randn(2048, 8192, dtype=torch.bfloat16, device="cuda") / 90 for _ in range(12)]
    for m in (1, 5):
        x = torch.randn(m, 8192, dtype=torch.bfloat16, device="cuda")
        alone = [gemv.gemv(x, w, None, config) for w in weights]
        torch.cuda.synchronize()
        graph, outs = torch.cuda.CUDAGraph(), []
        with torch.cuda.graph(graph):
            for _ in range(2):
                outs += [gemv.gemv(x, w, None, config) for w in weights]
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
        for got, expected in zip(outs, alone + alone, strict=True):
            assert torch.equal(got, expected)
        torch.testing.assert_close(
            alone[0].float(), (x.float() @ weights[0].float().T), rtol=1e-2, atol=1e-2
        )
    assert not SPLIT_K_ARRIVALS.get(x.device, 0).any()


@torch.inference_mode()
def test_decode_step_logits_with_and_without_fusion():
    """A small decode batch (the tuned GEMV path) against the unfused ops, through logits."""
    from tesela.bench.decode import decode_batch

    config, path = make_engine_config(
        "qwen3-0.6b", dtype="bfloat16", device="cuda", num_kv_tokens=8192, disable_cudagraph=True
    )
    runner = ModelRunner(config, path)
    for k, v in zip(runner.kv_cache.k_buffers, runner.kv_cache.v_buffers, strict=True):
        k.normal_()
        v.normal_()
    for batch_size in (1, 3, 16):
        batch = decode_batch(runner, batch_size, 100)
        fused_logits = runner.compute_logits(runner.forward_eager(batch))
        plain_logits = reference(lambda b=batch: runner.compute_logits(runner.forward_eager(b)))
        error = (fused_logits - plain_logits).norm() / plain_logits.norm()
        # Each kernel is within one bf16 step of what it replaces (the test above); 28 bf16
        # layers of random weights amplify those steps to a few percent of the logits (3.5%
        # at batch 1 on H100). A wrong kernel (a missing residual, a wrong norm weight) gives
        # errors of order 1.
        assert error < 6e-2, f"batch {batch_size}: relative error {error:.3g}"


def test_fused_decode_layer_launches_fewer_kernels():
    """Launches of one decoder layer in a batch-1 decode step, fused vs unfused (qwen3: q/k
    norm + rotary is one kernel instead of four)."""
    from tesela.bench.decode import launches_per_layer

    config, path = make_engine_config(
        "qwen3-0.6b", dtype="bfloat16", device="cuda", num_kv_tokens=4096, disable_cudagraph=True
    )
    runner = ModelRunner(config, path)
    fused_launches = launches_per_layer(runner)
    unfused_launches = reference(launches_per_layer, runner)
    print(f"launches per layer: fused {fused_launches}, unfused {unfused_launches}")
    assert fused_launches <= 12
    assert unfused_launches - fused_launches >= 3
