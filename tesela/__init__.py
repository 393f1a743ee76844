"""tesela: an LLM inference engine built around piecewise CUDA graphs."""

from tesela.engine.llm import LLM
from tesela.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"
