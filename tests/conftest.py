"""Shared fixtures: real HF checkpoints written to disk with random weights, and tokenizers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels run in Triton's interpreter, so a plain `pytest` runs the same
# suites as CI. It must be set before anything imports triton (triton.jit reads it then).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=512,
    initializer_range=0.05,
    rms_norm_eps=1e-6,
)

ARCHITECTURES = {
    "llama": (
        "LlamaConfig",
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=500000.0,
        ),
    ),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    # Mixture-of-experts: layer 0 of the Qwen3-MoE model is dense (mlp_only_layers).
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            head_dim=16,
            num_hidden_layers=3,
            num_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[0],
        ),
    ),
    "mixtral": ("MixtralConfig", dict(num_local_experts=6, num_experts_per_tok=2)),
}


def write_tokenizer(path: Path, vocab_size: int, eos_id: int, chat_template: str | None = None):
    """A word-level tokenizer.json: word `t{i}` is token i."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.save(str(path / "tokenizer.json"))
    config = {"eos_token": f"t{eos_id}", "bos_token": "t1"}
    if chat_template:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def write_checkpoint(path: Path, arch: str, *, max_shard_size: str | None = None, seed: int = 0):
    """Save a random-weight transformers model of `arch` as a real safetensors checkpoint."""
    import transformers

    config_cls, extra = ARCHITECTURES[arch]
    config = getattr(transformers, config_cls)(**{**SMALL, **extra}, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    write_tokenizer(path, SMALL["vocab_size"], eos_id=2)
    return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """arch -> (folder, transformers model) for every supported architecture."""
    result = {}
    for arch in ARCHITECTURES:
        path = tmp_path_factory.mktemp(arch)
        shard = "60KB" if arch == "llama" else None  # one sharded checkpoint
        result[arch] = (path, write_checkpoint(path, arch, max_shard_size=shard))
    return result


def pytest_collection_modifyitems(config, items):
    """Everything under tests/gpu is marked `gpu` and skips cleanly without CUDA."""
    cuda = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "/tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not cuda:
                item.add_marker(skip)
