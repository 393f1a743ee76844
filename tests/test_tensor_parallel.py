"""Tensor parallelism on CPU over gloo: two real processes, each loading its shard.

Each rank builds the model for its shard straight from a real safetensors checkpoint (written
here by transformers) or the `tiny` preset's dummy weights, runs the same extend and decode
batches, and rank 0 saves its logits; they must equal the single-process model's. The
checkpoints cover KV heads split (2 over 2 ranks) and replicated (1 KV head on 2 ranks), a
vocabulary that does not divide (321: padded), q/k/v biases (Qwen2), per-head norms and a tied
LM head (Qwen3).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tesela.engine.llm_engine import make_engine_config
from tesela.executor.forward_batch import ForwardBatch

PROMPTS = [[5, 17, 42, 8, 99, 3, 7], [200, 201, 12, 77]]
BLOCK = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_llama_one_kv_head(path: Path) -> None:
    """A sharded Llama checkpoint with a single KV head and an odd vocabulary."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=321,
        max_position_embeddings=512,
        initializer_range=0.05,
    )
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="60KB")


def run_batches(runner) -> list[torch.Tensor]:
    """An extend batch of both prompts, then two decode steps (greedy tokens fed back)."""
    tables = [[1, 2], [3, 4]]
    batch = ForwardBatch.build(
        token_ids=PROMPTS, prefix_lens=[0, 0], block_tables=tables, block_size=BLOCK, device="cpu"
    )
    logits = [runner.forward(batch)]
    lens = [len(p) for p in PROMPTS]
    for _ in range(2):
        tokens = [[int(t)] for t in logits[-1].argmax(-1)]
        batch = ForwardBatch.build(
            token_ids=tokens, prefix_lens=lens, block_tables=tables, block_size=BLOCK, device="cpu"
        )
        logits.append(runner.forward(batch))
        lens = [n + 1 for n in lens]
    return logits


def engine_config(model: str, tp: int):
    return make_engine_config(
        model,
        device="cpu",
        dtype="float32",
        attention_backend="torch",
        num_kv_tokens=256,
        tensor_parallel_size=tp,
    )


def rank_main(rank: int, world_size: int, port: int, models: list[str], out: str) -> None:
    from tesela.distributed.group import destroy_distributed, init_distributed
    from tesela.executor.model_runner import ModelRunner

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    tp = init_distributed(device="cpu", timeout_s=60)
    try:
        for i, model in enumerate(models):
            config, path = engine_config(model, world_size)
            runner = ModelRunner(config, path, tp)
            attention = runner.model.model.layers[0].self_attn
            shapes = {
                "qkv": tuple(attention.qkv_proj.weight.shape),
                "o": tuple(attention.o_proj.weight.shape),
                "embed": tuple(runner.model.model.embed_tokens.weight.shape),
                "kv_pool": tuple(runner.kv_cache.k_buffers[0].shape),
            }
            logits = run_batches(runner)
            if rank == 0:
                torch.save({"logits": logits, "shapes": shapes}, f"{out}/{i}.pt")
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def tp_models(checkpoints, tmp_path_factory) -> list[str]:
    llama = tmp_path_factory.mktemp("llama_kv1")
    write_llama_one_kv_head(llama)
    return ["tiny", str(llama), str(checkpoints["qwen2"][0]), str(checkpoints["qwen3"][0])]


def test_tp2_logits_and_greedy_equal_tp1(tp_models, tmp_path):
    from tesela.executor.model_runner import ModelRunner

    mp.spawn(rank_main, args=(2, free_port(), tp_models, str(tmp_path)), nprocs=2, join=True)
    for i, model in enumerate(tp_models):
        config, path = engine_config(model, 1)
        expected = run_batches(ModelRunner(config, path))
        got = torch.load(tmp_path / f"{i}.pt")
        for step, (a, b) in enumerate(zip(got["logits"], expected, strict=True)):
            assert a.shape == b.shape, (model, step)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{model} step {step}")
            assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
        # Each rank holds its shard only: half the query heads, its KV heads, half the vocab.
        mc = config.model_config
        kv_local = max(mc.num_key_value_heads // 2, 1) * mc.head_dim
        assert got["shapes"]["qkv"] == (mc.q_size // 2 + 2 * kv_local, mc.hidden_size)
        assert got["shapes"]["o"] == (mc.hidden_size, mc.q_size // 2)
        assert got["shapes"]["embed"] == (-(-mc.vocab_size // 2), mc.hidden_size)
        assert got["shapes"]["kv_pool"][1] == kv_local // mc.head_dim
