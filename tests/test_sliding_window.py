"""Sliding-window attention against transformers, on real checkpoints written by the test.

Each architecture has its own rule (tesela/config.py `_sliding_window`): Mistral windows every
layer by `sliding_window`; Qwen2/Qwen3 window only with `use_sliding_window`, and only the
layers from `max_window_layers` on; Llama never. The window (6) is shorter than the prompts, so
a backend that ignored it, or applied it to the wrong layers, would pick other tokens.

The Triton backend runs under TRITON_INTERPRET=1 (in a fresh process when the suite already
imported triton without it, as in tests/test_triton_attention.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from interpreter import rerun_under_interpreter, triton_interpreted

from tesela import LLM, SamplingParams
from tesela.config import ModelConfig

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

WINDOW = 6
PROMPTS = [[300, 301, 12, 77, 54, 23, 9, 81, 44, 6, 1, 19, 5], [5, 17, 42, 8, 99, 3, 250, 13, 7]]
MAX_TOKENS = 6
WINDOWED = {
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW)),
    # Layer 0 attends fully, layer 1 through the window.
    "qwen2": (
        "Qwen2Config",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
}


INTERPRETED_HERE = triton_interpreted()


@pytest.fixture(scope="module")
def windowed_checkpoints(tmp_path_factory):
    import transformers
    from conftest import SMALL, write_tokenizer

    result = {}
    for arch, (config_cls, extra) in WINDOWED.items():
        path = tmp_path_factory.mktemp(f"{arch}-window")
        config = getattr(transformers, config_cls)(**SMALL, **extra, eos_token_id=2, bos_token_id=1)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.eval().save_pretrained(path, safe_serialization=True)
        write_tokenizer(path, SMALL["vocab_size"], eos_id=2)
        result[arch] = (path, model)
    return result


def hf_greedy(model, prompt: list[int]) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def hf_without_window(path: Path) -> list[list[int]]:
    """What the same weights give with the window off: the test must tell the two apart."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    config.sliding_window = None
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = ["full_attention"] * config.num_hidden_layers
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=torch.float32
    )
    return [hf_greedy(model.eval(), p) for p in PROMPTS]


_references: dict[str, list[list[int]]] = {}


def reference(windowed_checkpoints, arch: str) -> list[list[int]]:
    """transformers' greedy tokens, checked to differ from those without the window."""
    if arch not in _references:
        path, hf_model = windowed_checkpoints[arch]
        expected = [hf_greedy(hf_model, p) for p in PROMPTS]
        assert expected != hf_without_window(path)
        _references[arch] = expected
    return _references[arch]


def check_matches_transformers(windowed_checkpoints, arch: str, backend: str) -> None:
    path, _ = windowed_checkpoints[arch]
    # Chunks of 5 tokens: the window spans the cached prefix and the chunk.
    llm = LLM(
        str(path),
        dtype="float32",
        device="cpu",
        attention_backend=backend,
        block_size=4,
        max_num_batched_tokens=5,
    )
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    got = [o.token_ids for o in llm.generate(PROMPTS, params)]
    assert got == reference(windowed_checkpoints, arch)


@pytest.mark.parametrize("arch", sorted(WINDOWED))
def test_torch_backend_matches_transformers_with_a_window(windowed_checkpoints, arch):
    check_matches_transformers(windowed_checkpoints, arch, "torch")


@pytest.mark.parametrize("arch", sorted(WINDOWED))
def test_triton_backend_matches_transformers_with_a_window(windowed_checkpoints, arch):
    if not INTERPRETED_HERE:
        pytest.skip("triton not loaded under TRITON_INTERPRET here: run by the fresh process")
    check_matches_transformers(windowed_checkpoints, arch, "triton")


def test_triton_in_a_fresh_interpreter_process():
    if INTERPRETED_HERE or torch.cuda.is_available():
        pytest.skip("the Triton tests run in this process (or on the GPU suite)")
    pytest.importorskip("triton")
    rerun_under_interpreter(__file__, "-k", "triton_backend", no_skips=True)


def hf_dict(arch: str, **fields) -> dict:
    base = dict(
        architectures=[arch],
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
    )
    return {**base, **fields}


@pytest.mark.parametrize(
    ("arch", "fields", "window", "layers"),
    [
        ("MistralForCausalLM", dict(sliding_window=4096), 4096, None),
        ("MistralForCausalLM", dict(sliding_window=None), None, None),
        ("Qwen2ForCausalLM", dict(sliding_window=4096), None, None),  # use_sliding_window off
        ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=64), None, None),
        (
            "Qwen2ForCausalLM",
            dict(use_sliding_window=True, sliding_window=64, max_window_layers=2),
            64,
            (2, 3),
        ),
        (
            "Qwen3ForCausalLM",
            dict(use_sliding_window=True, sliding_window=64, max_window_layers=0),
            64,
            None,
        ),
        (
            "Qwen3ForCausalLM",
            dict(
                use_sliding_window=True,
                sliding_window=64,
                layer_types=["full_attention", "sliding_attention"] * 2,
            ),
            64,
            (1, 3),
        ),
        ("LlamaForCausalLM", dict(sliding_window=64, use_sliding_window=True), None, None),
        ("MixtralForCausalLM", dict(sliding_window=64), 64, None),
        (
            "Qwen3MoeForCausalLM",
            dict(sliding_window=64, num_experts=4, num_experts_per_tok=2),
            None,
            None,
        ),
        (
            "Qwen3MoeForCausalLM",
            dict(
                use_sliding_window=True,
                sliding_window=64,
                max_window_layers=2,
                num_experts=4,
                num_experts_per_tok=2,
            ),
            64,
            None,  # Qwen3-MoE windows every layer: it has no max_window_layers rule
        ),
    ],
)
def test_each_architecture_reads_its_own_window_rule(arch, fields, window, layers):
    config = ModelConfig.from_hf_dict(hf_dict(arch, **fields))
    assert (config.sliding_window, config.sliding_window_layers) == (window, layers)
