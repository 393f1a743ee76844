"""EngineArgs: every engine option, defined once, for `LLM(...)`, the CLI and the server.

Each option is a dataclass field whose metadata carries its help text; `add_cli_args` turns
the fields into command-line flags (`--max-num-seqs` for `max_num_seqs`) with their defaults
shown, and `from_cli_args` reads them back. The engine resolves the "auto" values into a frozen
`EngineConfig` (`tesela.engine.llm_engine.make_engine_config`). This module imports only
config.py and presets.py (no torch), so `tesela --help` stays fast.

Names follow the field (vLLM/SGLang): `piecewise_cudagraph` is the piecewise capture mode,
`full_decode` the FULL decode graphs, `disable_cudagraph` turns both off. The spellings
of earlier versions are still accepted (with a warning) through `RENAMED`.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

from tesela.config import PIECEWISE_COMPILERS, PIECEWISE_CUDAGRAPH_MODES
from tesela.presets import DEFAULT_MODEL, PRESETS

# Old keyword / flag spelling -> the current one (kept because scripts and other branches use them).
RENAMED = {
    "prefill_graph": "piecewise_cudagraph",
    "piece_compiler": "piecewise_compiler",
    "disable_cuda_graph": "disable_cudagraph",
    "verify_graphs": "verify_cudagraphs",
}


def _option(default: Any, help: str, **cli: Any) -> Any:
    """A field with its help text (and argparse extras such as choices) in its metadata."""
    return field(default=default, metadata={"help": help, **cli})


def parse_int_list(text: str | list | tuple | None) -> tuple[int, ...] | None:
    """'16,64,256' (or a sequence) -> (16, 64, 256); a clear error for anything else."""
    if text is None or isinstance(text, (list, tuple)):
        return tuple(int(s) for s in text) if text is not None else None
    try:
        return tuple(int(s) for s in str(text).split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 16,64,256, got {text!r}"
        ) from None


@dataclass(frozen=True)
class EngineArgs:
    """The options of one engine; defaults are what `tesela generate` / `serve` use."""

    model: str = _option(
        DEFAULT_MODEL,
        f"a HF model folder, or a preset name (random weights, for shapes and tests): "
        f"{', '.join(PRESETS)}",
    )
    tokenizer: str | None = _option(None, "tokenizer folder (default: the model folder)")
    load_format: str = _option(
        "auto",
        "auto (safetensors for a folder, random weights for a preset) | safetensors | dummy",
        choices=["auto", "safetensors", "dummy"],
    )
    dtype: str = _option(
        "auto", "auto (the checkpoint's dtype on CUDA, float32 on CPU) | bfloat16 | float16 | ..."
    )
    device: str = _option("auto", "auto (cuda when available, else cpu) | cpu | cuda | cuda:N")
    seed: int = _option(0, "seed of random weights and of sampling without a per-request seed")
    generation_config: str = _option(
        "auto",
        "auto: sampling defaults from the model's generation_config.json | none: ignore it",
    )
    attention_backend: str = _option("auto", "auto (triton on CUDA, torch on CPU) | torch | triton")
    block_size: int = _option(16, "tokens per KV cache block")
    max_num_seqs: int = _option(256, "most requests in one batch")
    max_num_batched_tokens: int = _option(
        2048, "token budget of one step (the chunked-prefill size)"
    )
    max_model_len: int | None = _option(
        None, "most prompt + output tokens of one request (default: the model's, at most 8192)"
    )
    num_kv_tokens: int | None = _option(
        None, "KV cache size in tokens (default: from --gpu-memory-utilization on CUDA)"
    )
    gpu_memory_utilization: float = _option(
        0.85, "fraction of free GPU memory the KV cache may take"
    )
    piecewise_cudagraph: str | None = _option(
        None,
        "piecewise CUDA graph mode for prefill/mixed batches (default: breakable on CUDA, "
        "none on CPU)",
        choices=list(PIECEWISE_CUDAGRAPH_MODES),
    )
    piecewise_compiler: str = _option(
        "eager",
        "how `compiled` piecewise graphs compile each piece",
        choices=list(PIECEWISE_COMPILERS),
    )
    capture_sizes: tuple[int, ...] | None = _option(
        None,
        "comma-separated token counts to capture piecewise graphs for (default: the ladder)",
        type=parse_int_list,
    )
    max_capture_tokens: int | None = _option(
        None, "largest piecewise capture size (default: --max-num-batched-tokens)"
    )
    disable_cudagraph: bool = _option(False, "run every batch eagerly (no CUDA graphs at all)")
    full_mixed: bool = _option(
        True,
        "FULL CUDA graphs for extend and mixed batches (attention inside) when the attention "
        "backend declares ALWAYS graph support (--no-full-mixed: those batches run piecewise)",
    )
    enable_prefix_caching: bool = _option(
        True,
        "share the KV of repeated prompt prefixes across requests (--no-enable-prefix-caching "
        "turns it off)",
    )
    verify_cudagraphs: bool = _option(
        False, "compare every captured size with the eager forward at startup"
    )
    enable_lora: bool = _option(False, "serve LoRA adapters (PEFT folders)")
    max_loras: int = _option(4, "LoRA adapters on the device at once (slots, taken at startup)")
    max_lora_rank: int = _option(16, "largest LoRA rank an adapter may have")
    max_cpu_loras: int | None = _option(
        None, "LoRA adapters kept on the CPU (default: --max-loras); more are read from disk"
    )
    lora_backend: str = _option(
        "auto",
        "auto (triton on CUDA, torch on CPU) | triton | torch: the LoRA kernels",
        choices=["auto", "triton", "torch"],
    )
    tensor_parallel_size: int = _option(
        1, "GPUs to split the model over (one worker process per GPU; gloo ranks on CPU)"
    )
    distributed_timeout_s: float = _option(
        120.0, "seconds a collective or a worker may stall before the engine fails"
    )
    custom_all_reduce: bool = _option(
        False,
        "experimental: reduce small tensor-parallel messages over NVLink peer memory "
        "(symmetric memory) where every rank can, NCCL above (default: NCCL for all; it "
        "measured no faster inside decode graphs, and the TP engine tests failed with it on "
        "in one GPU run)",
    )
    fused_all_reduce_add_norm: bool = _option(
        True,
        "under tensor parallelism, reduce decode batches' partial sums together with the "
        "residual add and RMSNorm after them, in one kernel over NVLink peer memory (single "
        "host, CUDA); --no-fused-all-reduce-add-norm keeps NCCL and a separate norm",
    )
    overlap_schedule: str = _option(
        "auto",
        "schedule and build step N+1 while the GPU runs step N: auto (on for CUDA at "
        "--tensor-parallel-size 1; off on CPU and under tensor parallelism) | on | off",
        choices=["auto", "on", "off"],
    )

    def __post_init__(self) -> None:
        if self.capture_sizes is not None:
            object.__setattr__(self, "capture_sizes", parse_int_list(self.capture_sizes))

    @classmethod
    def from_kwargs(cls, model: str = DEFAULT_MODEL, **kwargs: Any) -> EngineArgs:
        """`LLM(model, **kwargs)`: the fields by name; unknown names are a clear error."""
        names = {f.name for f in dataclasses.fields(cls)}
        for old, new in RENAMED.items():
            if old in kwargs:
                warnings.warn(f"{old}= is now {new}=", DeprecationWarning, stacklevel=3)
                kwargs[new] = kwargs.pop(old)
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(
                f"unknown engine option(s) {', '.join(unknown)}: the options are "
                f"{', '.join(sorted(names - {'model'}))}"
            )
        return cls(model=model, **kwargs)

    @classmethod
    def add_cli_args(
        cls,
        parser: argparse.ArgumentParser,
        *,
        skip: tuple[str, ...] = (),
        only: tuple[str, ...] | None = None,
    ) -> None:
        """One flag per field: `--name-with-dashes`, its help, its default shown. `only`: just
        these fields (a benchmark that sets the rest itself)."""
        group = parser.add_argument_group("engine options")
        old_names = {new: old for old, new in RENAMED.items()}
        for f in dataclasses.fields(cls):
            if f.name in skip or (only is not None and f.name not in only):
                continue
            kwargs = {k: v for k, v in f.metadata.items() if k != "help"}
            help_text = f.metadata["help"]
            if "(default:" not in help_text:
                help_text += f" (default: {_shown(f.default)})"
            if f.type == "bool":
                # A flag that defaults on needs its --no- form to be turned off.
                action = argparse.BooleanOptionalAction if f.default else "store_true"
                kwargs.update(action=action, default=f.default)
            else:
                kwargs.setdefault("type", _cli_type(f.type))
                kwargs.update(default=f.default, metavar=_metavar(f))
            group.add_argument(
                "--" + f.name.replace("_", "-"), dest=f.name, help=help_text, **kwargs
            )
            if f.name in old_names:  # the old spelling still works, unlisted
                old_flag = "--" + old_names[f.name].replace("_", "-")
                group.add_argument(old_flag, dest=f.name, help=argparse.SUPPRESS, **kwargs)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        values = {
            f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)
        }
        return cls(**values)

    def replace(self, **changes: Any) -> EngineArgs:
        return dataclasses.replace(self, **changes)


def _cli_type(annotation: str):
    if annotation.startswith("int"):
        return int
    if annotation.startswith("float"):
        return float
    return str


def _metavar(f: dataclasses.Field) -> str | None:
    if "choices" in f.metadata:
        return None  # argparse lists the choices
    return _cli_type(f.type).__name__.upper() if f.type != "tuple[int, ...] | None" else "N,N,..."


def _shown(default: Any) -> str:
    return "unset" if default is None else str(default)
