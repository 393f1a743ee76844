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


# LoRA adapters: (rank, alpha, rsLoRA, target modules)
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_ADAPTERS = {
    "full": (8, 16, False, ALL_MODULES),
    "rslora": (4, 8, True, ["q_proj", "v_proj", "down_proj"]),
    "mlp": (2, 4, False, ["gate_proj", "up_proj", "o_proj"]),
}


def write_adapter(base_path, out_path, name: str, seed: int):
    """A PEFT adapter with random, non-zero A and B, saved by peft itself; the peft model."""
    import peft
    import transformers

    rank, alpha, rslora, modules = LORA_ADAPTERS[name]
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        use_rslora=rslora,
        target_modules=modules,
        init_lora_weights=False,  # random B: the adapter really changes the outputs
    )
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_" in param_name:
                param.normal_(0.0, 0.2)
    model.save_pretrained(out_path)
    return model.eval()


class Adapters(dict):
    """arch -> {adapter name: (LoRARequest, peft model)}: PEFT adapters with random,
    non-zero A and B for each checkpoint, each written on first use."""

    def __init__(self, checkpoints, tmp_path_factory) -> None:
        super().__init__()
        self.checkpoints, self.tmp = checkpoints, tmp_path_factory

    def __missing__(self, arch: str):
        self[arch] = ArchAdapters(self, arch)
        return self[arch]


class ArchAdapters(dict):
    def __init__(self, owner: Adapters, arch: str) -> None:
        super().__init__()
        self.owner, self.arch = owner, arch

    def __missing__(self, name: str):
        from tesela.lora.request import LoRARequest

        index = list(LORA_ADAPTERS).index(name)
        folder = self.owner.tmp.mktemp(f"{self.arch}-{name}")
        path = self.owner.checkpoints[self.arch][0]
        model = write_adapter(path, folder, name, seed=10 + index)
        self[name] = (LoRARequest(name, index + 1, str(folder)), model)
        return self[name]

    def all(self) -> list[tuple]:
        return [self[name] for name in LORA_ADAPTERS]


@pytest.fixture(scope="session")
def lora_adapters(checkpoints, tmp_path_factory):
    return Adapters(checkpoints, tmp_path_factory)


def pytest_collection_modifyitems(config, items):
    """Everything under tests/gpu is marked `gpu` and skips cleanly without CUDA."""
    cuda = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "/tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not cuda:
                item.add_marker(skip)
