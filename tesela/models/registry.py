"""Model classes by the HF `architectures` name in config.json, imported lazily."""

from __future__ import annotations

import importlib

from torch import nn

from tesela.config import ModelConfig

_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("tesela.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("tesela.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("tesela.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("tesela.models.llama", "LlamaForCausalLM"),
    "Qwen3MoeForCausalLM": ("tesela.models.moe", "MoeForCausalLM"),
    "MixtralForCausalLM": ("tesela.models.moe", "MoeForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def check_architecture(architectures: list[str]) -> None:
    """Raise the user error for a config.json whose first architecture tesela cannot build."""
    if architectures and architectures[0] not in _ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architectures[0]!r} in config.json: tesela supports "
            f"{', '.join(supported_architectures())}"
        )


def model_class(config: ModelConfig) -> type[nn.Module]:
    try:
        module_name, class_name = _ARCHITECTURES[config.architecture]
    except KeyError:
        raise ValueError(
            f"unknown architecture {config.architecture!r} in config.json: tesela supports "
            f"{', '.join(supported_architectures())}"
        ) from None
    return getattr(importlib.import_module(module_name), class_name)
