"""tesela: an LLM inference engine built around piecewise CUDA graphs."""

from __future__ import annotations

__all__ = ["LLM", "LoRARequest", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that torch-free parts (scheduler, block manager) import without torch.
    if name == "LLM":
        from tesela.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from tesela.engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "LoRARequest":
        from tesela.lora.request import LoRARequest

        return LoRARequest
    raise AttributeError(f"module 'tesela' has no attribute {name!r}")
