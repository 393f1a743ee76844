"""Mixture-of-experts models on CPU with the torch reference experts.

Greedy tokens and logprobs against transformers on small random Qwen3-MoE and Mixtral
checkpoints written to disk (per-expert tensors, as on the Hub), the router rules, the
device-side pair sort, checkpoint loading, and the piecewise runner on a MoE model. The Triton
kernels are tested under the interpreter in tests/test_moe_triton.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from tesela import LLM, SamplingParams
from tesela.config import ModelConfig, MoeConfig
from tesela.core.forward_batch import ForwardBatch
from tesela.engine.llm_engine import make_engine_config
from tesela.executor.model_runner import ModelRunner
from tesela.layers.moe.align import moe_align_block_size
from tesela.layers.moe.reference import moe_reference
from tesela.layers.moe.router import select_experts
from tesela.models.loader import build_model
from tests.test_reference import PROMPTS, hf_greedy

MAX_TOKENS = 8


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_greedy_tokens_and_logprobs_match_transformers(checkpoints, arch):
    path, hf_model = checkpoints[arch]
    llm = LLM(str(path), dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=3)
    outputs = llm.generate(PROMPTS, params)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        tokens, hf_logprobs = hf_greedy(hf_model, prompt)
        assert output.token_ids == tokens
        for step, token_logprobs in enumerate(output.logprobs):
            expected = hf_logprobs[len(prompt) - 1 + step][tokens[step]].item()
            assert abs(token_logprobs.logprob - expected) <= 1e-4 * max(1.0, abs(expected))


def test_moe_config_follows_the_checkpoint(checkpoints):
    qwen = ModelConfig.from_pretrained(checkpoints["qwen3_moe"][0])
    assert qwen.moe == MoeConfig(8, 3, 32, "softmax_topk", True, 1, (0,))
    assert [qwen.is_moe_layer(i) for i in range(3)] == [False, True, True]
    mixtral = ModelConfig.from_pretrained(checkpoints["mixtral"][0])
    assert mixtral.moe.scoring == "topk_softmax" and mixtral.moe.num_experts == 6
    assert mixtral.moe.intermediate_size == mixtral.intermediate_size
    # decoder_sparse_step: transformers' rule, (layer + 1) % step == 0
    step2 = MoeConfig(8, 2, 32, decoder_sparse_step=2)
    assert [step2.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    hf = {**qwen_hf_dict(), "num_experts_per_tok": 9}
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig.from_hf_dict(hf)


def qwen_hf_dict() -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_experts": 8,
        "moe_intermediate_size": 16,
    }


def test_num_parameters_matches_transformers(checkpoints):
    for arch in ("qwen3_moe", "mixtral"):
        path, hf_model = checkpoints[arch]
        config = ModelConfig.from_pretrained(path)
        assert config.num_parameters() == sum(p.numel() for p in hf_model.parameters())


def test_router_rules_match_transformers():
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    torch.manual_seed(0)
    hidden = torch.randn(7, 16)
    for cls, config, scoring in [
        (Qwen3MoeTopKRouter, Qwen3MoeConfig(hidden_size=16, num_experts=8, norm_topk_prob=True,
                                            num_experts_per_tok=3), "softmax_topk"),
        (Qwen3MoeTopKRouter, Qwen3MoeConfig(hidden_size=16, num_experts=8, norm_topk_prob=False,
                                            num_experts_per_tok=3), "softmax_topk"),
        (MixtralTopKRouter, MixtralConfig(hidden_size=16, num_local_experts=8,
                                          num_experts_per_tok=3), "topk_softmax"),
    ]:  # fmt: skip
        router = cls(config)
        torch.nn.init.normal_(router.weight)
        _, hf_weights, hf_ids = router(hidden)
        logits = hidden @ router.weight.T
        renorm = getattr(config, "norm_topk_prob", False)
        weights, ids = select_experts(logits, 3, scoring, renorm)
        assert torch.equal(ids, hf_ids)
        torch.testing.assert_close(weights, hf_weights, rtol=1e-6, atol=1e-7)
        assert weights.dtype == hf_weights.dtype


def test_align_sorts_pairs_by_expert_in_padded_blocks():
    num_experts, block = 5, 4
    # expert 1 gets no token, expert 3 gets five pairs; id 5 is out of range (a padding token).
    topk_ids = torch.tensor([[3, 0], [3, 4], [3, 2], [0, 3], [3, 5]])
    aligned = moe_align_block_size(topk_ids, block, num_experts)
    assert aligned.sorted_pair_ids.numel() == 28  # 10 pairs + 5 * 3, rounded up to blocks
    used = int(aligned.num_padded_pairs)
    assert used == 4 + 0 + 4 + 8 + 4  # experts 0, 1 (none), 2, 3 (five -> eight), 4
    ids = aligned.sorted_pair_ids[:used].view(-1, block).tolist()
    sentinel = topk_ids.numel()
    assert ids == [[1, 6, sentinel, sentinel], [5, sentinel, sentinel, sentinel],
                   [0, 2, 4, 7], [8, sentinel, sentinel, sentinel], [3] + [sentinel] * 3]  # fmt: skip
    assert aligned.block_expert_ids[: used // block].tolist() == [0, 2, 3, 3, 4]
    assert (aligned.block_expert_ids[used // block :] == num_experts).all()
    assert 9 not in aligned.sorted_pair_ids.tolist()  # the padding pair is dropped


def test_reference_drops_out_of_range_experts():
    torch.manual_seed(0)
    w13, w2 = torch.randn(4, 12, 8), torch.randn(4, 8, 6)
    hidden, weights = torch.randn(3, 8), torch.rand(3, 2)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]])
    full = moe_reference(hidden, w13, w2, weights, ids)
    padded = moe_reference(hidden, w13, w2, weights, torch.tensor([[0, 1], [4, 4], [1, 2]]))
    assert torch.equal(padded[1], torch.zeros(8))
    torch.testing.assert_close(padded[[0, 2]], full[[0, 2]])


def test_loader_accepts_fused_expert_tensors_and_names_missing_experts(checkpoints, tmp_path):
    """transformers 5 can also write the stacked layout; a missing expert is named."""
    path, _ = checkpoints["mixtral"]
    config = ModelConfig.from_pretrained(path)
    per_expert = build_model(config, dtype=torch.float32, device="cpu", path=path)
    tensors = load_file(path / "model.safetensors")
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        experts = f"{prefix}.block_sparse_moe.experts"
        gate_up = [torch.cat([tensors[f"{experts}.{e}.w1.weight"], tensors[f"{experts}.{e}.w3.weight"]])
                   for e in range(6)]  # fmt: skip
        fused[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        fused[f"{prefix}.mlp.experts.down_proj"] = torch.stack(
            [tensors[f"{experts}.{e}.w2.weight"] for e in range(6)]
        )
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(fused, tmp_path / "model.safetensors")
    from_fused = build_model(config, dtype=torch.float32, device="cpu", path=tmp_path)
    for (name, a), (_, b) in zip(
        per_expert.named_parameters(), from_fused.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    del tensors["model.layers.1.block_sparse_moe.experts.4.w3.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts\.4\.up_proj"):
        build_model(config, dtype=torch.float32, device="cpu", path=tmp_path)


def random_batch(num_tokens: int, seed: int) -> ForwardBatch:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 320, (num_tokens,), generator=generator).tolist()
    return ForwardBatch.build(
        token_ids=[tokens],
        prefix_lens=[0],
        block_tables=[list(range(1, num_tokens // 16 + 2))],
        block_size=16,
        device="cpu",
    )


@pytest.mark.parametrize("piecewise_cudagraph", ["breakable", "compiled"])
def test_piecewise_runner_equals_eager_on_a_moe_model(checkpoints, piecewise_cudagraph):
    """The MoE layer runs inside the pieces: padded replays equal eager for every count."""
    path = str(checkpoints["qwen3_moe"][0])
    common = dict(num_kv_tokens=1024, max_num_batched_tokens=32)
    eager = ModelRunner(*make_engine_config(path, **common))
    piecewise = ModelRunner(
        *make_engine_config(path, piecewise_cudagraph=piecewise_cudagraph, **common)
    )
    assert piecewise.piecewise is not None
    for n in (1, 3, 4, 5, 17, 32):
        got = piecewise.piecewise.run(random_batch(n, seed=n))
        torch.testing.assert_close(got, eager.forward_eager(random_batch(n, seed=n)))


def test_decode_step_weight_bytes_counts_routed_experts_only(checkpoints):
    from tesela.models.step_bytes import decode_step_weight_bytes, record_routed_experts
    from tesela.presets import PRESETS

    path = str(checkpoints["qwen3_moe"][0])
    runner = ModelRunner(*make_engine_config(path, num_kv_tokens=256))
    config, h = runner.config.model_config, runner.config.model_config.hidden_size
    all_bytes = sum(p.numel() * 4 for p in runner.model.parameters())
    unread_embedding_rows = (config.vocab_size - 1) * h * 4
    with record_routed_experts(runner.model) as routed:
        runner.forward_eager(random_batch(1, seed=0))
    assert routed == [3, 3]  # top_k experts in each of the two sparse layers
    idle_experts = 2 * (8 - 3) * 3 * h * 32 * 4
    assert (
        decode_step_weight_bytes(config, 1, 4, routed)
        == all_bytes - unread_embedding_rows - idle_experts
    )
    assert decode_step_weight_bytes(config, 1, 4, [8, 8]) == all_bytes - unread_embedding_rows
    dense = ModelConfig.from_hf_dict(PRESETS["llama-3-8b"])
    embed = dense.vocab_size * dense.hidden_size * 2
    assert (
        decode_step_weight_bytes(dense, 1, 2)
        == dense.num_parameters() * 2 - embed + dense.hidden_size * 2
    )
    # Qwen3-30B-A3B at batch 1 reads ~3.3B parameters' worth of weights of its 30.5B.
    qwen = ModelConfig.from_hf_dict(PRESETS["qwen3-30b-a3b"])
    assert 3.0e9 < decode_step_weight_bytes(qwen, 1, 1, [8] * 48) < 3.6e9


class MoeCalls(TorchDispatchMode):
    """Observes every `tesela::fused_moe` call (also those a CPU stand-in graph replays): the
    real-token count it read and its output."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.tesela.fused_moe.default:
            count = args[5]
            self.calls.append((None if count is None else int(count), out.clone()))
        return out


def test_padding_tokens_route_to_no_expert_in_padded_replays(checkpoints):
    """A replay of 5 tokens on the 8-token graph: every MoE layer reads 5 as the count of real
    tokens on the device, so the padding reaches no expert; the real tokens equal eager."""
    from tesela.layers.moe import padding

    path = str(checkpoints["qwen3_moe"][0])
    common = dict(num_kv_tokens=1024, max_num_batched_tokens=32)
    runner = ModelRunner(*make_engine_config(path, piecewise_cudagraph="breakable", **common))
    assert runner.piecewise.padded_size(5) == 8
    with MoeCalls() as observed:
        got = runner.piecewise.run(random_batch(5, seed=3))
    assert len(observed.calls) == 2  # the two sparse layers, replayed
    for count, out in observed.calls:
        assert count == 5 and out.shape[0] == 8
        assert torch.equal(out[5:], torch.zeros_like(out[5:]))
    torch.testing.assert_close(got, runner.forward_eager(random_batch(5, seed=3)))
    assert int(padding.num_valid_tokens(got.device)) == padding.ALL_TOKENS  # reset on exit


def test_tile_configs_by_shape_and_token_bucket():
    from tesela.layers.moe.tile_configs import CONFIG_FILE, default_config, get_config

    gemv, grouped = {"path": "gemv", "BLOCK_N": 64}, {"path": "grouped", "BLOCK_M": 32}
    table = {"128,1536,2048": {"1": gemv, "16": grouped}}
    assert get_config(128, 1536, 2048, 1, table) == gemv
    assert get_config(128, 1536, 2048, 31, table) == grouped  # bucket 16 serves 16..31 tokens
    # Untuned buckets take the default, never a neighbour's tiles (a GEMV at 4096 tokens).
    assert get_config(128, 1536, 2048, 15, table) == default_config(15)
    assert get_config(128, 1536, 2048, 4096, table) == default_config(4096)
    assert get_config(128, 2048, 768, 4096, table) == default_config(4096)  # shape not tuned
    assert default_config(8)["path"] == "gemv" and default_config(9)["path"] == "grouped"
    # The down GEMV (k pairs per program, M rows) has its own default tiles.
    assert get_config(128, 2048, 768, 1, table, gemm="down") == default_config(1, "down")
    assert default_config(1, "down")["BLOCK_N"] < default_config(1)["BLOCK_N"]
    json.loads(CONFIG_FILE.read_text())  # the shipped table parses
