"""Frozen configuration objects.

Every limit the engine uses is a field here, defined once. "auto" values are resolved by the
`resolve_*` helpers before an object is built; a built config is never patched.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "float16": "float16",
}


def normalize_dtype(name: str) -> str:
    try:
        return _DTYPE_ALIASES[str(name).lower()]
    except KeyError:
        raise ValueError(
            f"unsupported dtype {name!r}: use one of {', '.join(SUPPORTED_DTYPES)} (or 'auto')"
        ) from None


@dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling as HF writes it in config.json (`rope_scaling` / `rope_parameters`)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


ROUTER_SCORING = ("softmax_topk", "topk_softmax")


@dataclass(frozen=True)
class MoeConfig:
    """The sparse MLP of a mixture-of-experts model (Qwen3-MoE, Mixtral), from config.json.

    `scoring` is the router's rule: "softmax_topk" (Qwen3-MoE) takes a softmax over all
    experts, then the top-k, renormalised when `norm_topk_prob`; "topk_softmax" (Mixtral)
    takes the top-k logits and a softmax over those k (the same as renormalising the top-k of
    a full softmax, which is how transformers writes it)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    scoring: str = "softmax_topk"
    norm_topk_prob: bool = False  # transformers' default
    decoder_sparse_step: int = 1  # every step-th layer is sparse (Qwen3-MoE)
    mlp_only_layers: tuple[int, ...] = ()  # dense layers by index (Qwen3-MoE)

    def __post_init__(self) -> None:
        if self.scoring not in ROUTER_SCORING:
            raise ValueError(f"MoE scoring must be one of {ROUTER_SCORING}, got {self.scoring!r}")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.top_k}) must be in 1..num_experts ({self.num_experts})"
            )
        if self.decoder_sparse_step <= 0:
            raise ValueError(
                f"decoder_sparse_step must be positive, got {self.decoder_sparse_step}"
            )

    def is_moe_layer(self, layer_id: int) -> bool:
        return (
            layer_id not in self.mlp_only_layers and (layer_id + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_hf_dict(cls, arch: str, hf: dict[str, Any]) -> MoeConfig | None:
        if arch == "MixtralForCausalLM":
            return cls(
                num_experts=int(hf.get("num_local_experts", 8)),
                top_k=int(hf.get("num_experts_per_tok", 2)),
                intermediate_size=int(hf["intermediate_size"]),
                scoring="topk_softmax",
            )
        if arch == "Qwen3MoeForCausalLM":
            # transformers 5 writes `num_local_experts`; the Hub's configs say `num_experts`.
            num_experts = hf.get("num_experts") or hf.get("num_local_experts")
            if not num_experts:
                raise ValueError(
                    "Qwen3MoeForCausalLM config.json needs num_experts: dense Qwen3 checkpoints "
                    "are Qwen3ForCausalLM"
                )
            return cls(
                num_experts=int(num_experts),
                top_k=int(hf.get("num_experts_per_tok", 8)),
                intermediate_size=int(hf.get("moe_intermediate_size", hf["intermediate_size"])),
                scoring="softmax_topk",
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                decoder_sparse_step=int(hf.get("decoder_sparse_step") or 1),
                mlp_only_layers=tuple(int(i) for i in hf.get("mlp_only_layers") or ()),
            )
        return None


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a decoder-only Llama-family model, read from an HF config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k
    hidden_act: str = "silu"
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Keys a query sees at most (itself included), as transformers applies it; None: no
    # window. `sliding_window_layers` lists the layers that use it (None: every layer).
    sliding_window: int | None = None
    sliding_window_layers: tuple[int, ...] | None = None
    moe: MoeConfig | None = None  # Qwen3-MoE, Mixtral: the sparse MLP of their MoE layers

    def layer_sliding_window(self, layer_id: int) -> int | None:
        if self.sliding_window_layers is None or layer_id in self.sliding_window_layers:
            return self.sliding_window
        return None

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.moe is not None and self.moe.is_moe_layer(layer_id)

    def num_parameters(self) -> int:
        h, i, layers = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        attention = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 2 * h
        attention += 2 * self.head_dim if self.qk_norm else 0
        total = 0
        for layer_id in range(layers):
            if self.is_moe_layer(layer_id):
                e, moe_i = self.moe.num_experts, self.moe.intermediate_size
                total += attention + e * h + e * 3 * h * moe_i
            else:
                total += attention + 3 * h * i
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total + embed + h

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        archs = hf.get("architectures") or []
        if not archs:
            raise ValueError(
                "config.json has no 'architectures' list: tesela picks the model class by it "
                "(e.g. ['LlamaForCausalLM'])"
            )
        # An unknown architecture is refused by tesela.models.registry.model_class when the
        # model is built (the registry sits above this module: docs/architecture.md).
        arch = archs[0]
        missing = [k for k in _REQUIRED_FIELDS if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks required field(s): {', '.join(missing)}")
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"
        return cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_theta(hf)),
            rope_scaling=_rope_scaling(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", arch.startswith("Qwen2"))),
            qk_norm=arch.startswith("Qwen3"),
            hidden_act=str(hf.get("hidden_act", "silu")),
            torch_dtype=normalize_dtype(dtype),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            **_sliding_window(arch, hf, int(hf["num_hidden_layers"])),
            moe=MoeConfig.from_hf_dict(arch, hf),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, hf: dict[str, Any] | None = None) -> ModelConfig:
        """The model folder's config; `hf`: its config.json when the caller read it already
        (read_hf_config), so the file is read once."""
        hf = read_hf_config(path) if hf is None else hf
        try:
            return cls.from_hf_dict(hf)
        except ValueError as exc:
            raise ValueError(f"{Path(path) / 'config.json'}: {exc}") from None


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """A model folder's config.json, with errors that say what to do."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no config.json in {path}: a model folder needs config.json, safetensors "
            "weights and tokenizer.json (or pass a preset name such as 'tiny')"
        )
    try:
        hf = json.loads(config_file.read_text())
    except ValueError as exc:
        raise ValueError(
            f"{config_file} is not valid JSON ({exc}): fix or re-download it"
        ) from None
    if not isinstance(hf, dict):
        raise ValueError(f"{config_file} is not a JSON object: fix or re-download it")
    return hf


_REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def _sliding_window(arch: str, hf: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Each architecture's own rule, as its transformers model applies it:
    - Mistral, Mixtral: `sliding_window` (null: none) on every layer;
    - Qwen3-MoE: only with `use_sliding_window`, on every layer;
    - Qwen2/Qwen3: only with `use_sliding_window`, on the layers `layer_types` marks
      "sliding_attention" (by default those from `max_window_layers` on);
    - Llama: never (a `sliding_window` key in its config.json is ignored, as transformers does).
    """
    window = hf.get("sliding_window")
    if arch.startswith(("Mistral", "Mixtral")):
        return {"sliding_window": int(window) if window else None}
    if arch.startswith("Qwen3Moe"):
        on = hf.get("use_sliding_window") and window
        return {"sliding_window": int(window)} if on else {}
    if not arch.startswith(("Qwen2", "Qwen3")) or not hf.get("use_sliding_window") or not window:
        return {}
    layer_types = hf.get("layer_types")
    if layer_types is None:
        first = int(hf.get("max_window_layers", 28))
        layers = tuple(range(first, num_layers))
    else:
        layers = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
    if not layers:
        return {}
    every = layers == tuple(range(num_layers))
    return {"sliding_window": int(window), "sliding_window_layers": None if every else layers}


def _rope_params(hf: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 writes `rope_parameters`; 4.x writes `rope_theta` + `rope_scaling`.
    return hf.get("rope_parameters") or hf.get("rope_scaling") or {}


def _rope_theta(hf: dict[str, Any]) -> float:
    return hf.get("rope_theta") or _rope_params(hf).get("rope_theta") or 10000.0


def _rope_scaling(hf: dict[str, Any]) -> RopeScaling:
    params = _rope_params(hf)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ("default", "llama3"):
        raise ValueError(
            f"rope scaling type {rope_type!r} is not supported yet: tesela supports "
            "'default' (none) and 'llama3'"
        )
    if rope_type == "default":
        return RopeScaling()
    return RopeScaling(
        rope_type=rope_type,
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. Block 0 is reserved: its first slot is the dummy slot padded tokens use."""

    block_size: int = 16
    # On CUDA the pool takes this fraction of the memory left after weights and graphs.
    gpu_memory_utilization: float = 0.85
    # On CPU (and when set on CUDA) the pool holds exactly this many token slots.
    num_kv_tokens: int | None = None
    # Share the KV of full blocks across requests with the same prefix (block_manager.py).
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = 256  # requests in one batch
    max_num_batched_tokens: int = 2048  # token budget of one step (the chunked-prefill size)
    max_model_len: int = 4096  # prompt + output tokens of one request

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


# generation_config.json key -> the SamplingParams field it sets a default for.
GENERATION_CONFIG_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def read_generation_config(setting: str, model_path: str | None) -> dict[str, Any]:
    """Sampling defaults from generation_config.json: `auto` reads the model folder's (if
    any), `none` ignores it, anything else is a folder holding one. Sampling applies only
    when the file says `do_sample` (or leaves it out), as in transformers."""
    if setting == "none":
        return {}
    folder = model_path if setting == "auto" else setting
    if folder is None:
        return {}
    file = Path(folder) / "generation_config.json"
    if not file.is_file():
        if setting != "auto":
            raise FileNotFoundError(f"no generation_config.json in {folder} (--generation-config)")
        return {}
    try:
        hf = json.loads(file.read_text())
    except ValueError as exc:
        raise ValueError(
            f"{file} is not valid JSON ({exc}): fix it or pass --generation-config none"
        ) from None
    defaults = {
        field: hf[key] for key, field in GENERATION_CONFIG_FIELDS.items() if hf.get(key) is not None
    }
    if hf.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


def default_capture_sizes(max_size: int) -> tuple[int, ...]:
    """The piecewise capture ladder (in the spirit of SGLang's), always ending at max_size."""
    sizes = list(range(4, 33, 4))
    sizes += list(range(48, 257, 16))
    sizes += list(range(288, 513, 32))
    sizes += list(range(576, 1025, 64))
    sizes += list(range(1280, 4097, 256))
    sizes += list(range(4608, max(max_size, 4608) + 1, 512))
    ladder = sorted({s for s in sizes if s <= max_size} | {max_size})
    return tuple(ladder)


def default_decode_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The full-decode-graph ladder: 1, 2, 4, 8, then steps of 8, always ending at max_batch."""
    sizes = [1, 2, 4] + list(range(8, max_batch + 1, 8))
    return tuple(sorted({s for s in sizes if s <= max_batch} | {max_batch}))


PIECEWISE_CUDAGRAPH_MODES = ("breakable", "compiled", "none")
PIECEWISE_COMPILERS = ("eager", "inductor")


@dataclass(frozen=True)
class GraphConfig:
    """CUDA graph settings. Build it through `resolve_graph_config` to fill in the defaults."""

    piecewise_cudagraph: str = "breakable"  # breakable | compiled | none
    piecewise_compiler: str = "eager"  # eager | inductor (for `compiled`)
    capture_sizes: tuple[int, ...] = ()
    max_capture_tokens: int = 2048
    full_decode: bool = True
    decode_batch_sizes: tuple[int, ...] = ()
    # FULL graphs for extend and mixed batches (whole forward, attention inside) at the
    # piecewise ladder's sizes, for backends that declare ALWAYS graph support.
    full_mixed: bool = False
    verify_cudagraphs: bool = False  # compare every captured size with eager at capture time

    def __post_init__(self) -> None:
        if self.piecewise_cudagraph not in PIECEWISE_CUDAGRAPH_MODES:
            raise ValueError(
                f"piecewise_cudagraph must be one of {PIECEWISE_CUDAGRAPH_MODES}, got {self.piecewise_cudagraph!r}"
            )
        if self.piecewise_compiler not in PIECEWISE_COMPILERS:
            raise ValueError(
                f"piecewise_compiler must be one of {PIECEWISE_COMPILERS}, got {self.piecewise_compiler!r}"
            )
        if any(s <= 0 for s in self.capture_sizes):
            raise ValueError(f"capture sizes must be positive, got {self.capture_sizes}")
        if self.capture_sizes and list(self.capture_sizes) != sorted(set(self.capture_sizes)):
            raise ValueError("capture_sizes must be strictly increasing")

    @property
    def piecewise_enabled(self) -> bool:
        return self.piecewise_cudagraph != "none" and bool(self.capture_sizes)

    def capture_plan(self) -> tuple:
        """What is captured, in capture order (largest first): equal on every TP rank."""
        return (
            self.piecewise_cudagraph,
            self.piecewise_compiler,
            tuple(reversed(self.capture_sizes)),
            self.full_decode,
            tuple(reversed(self.decode_batch_sizes)),
            self.full_mixed,
        )


def resolve_graph_config(
    *,
    piecewise_cudagraph: str | None = None,
    piecewise_compiler: str = "eager",
    capture_sizes: tuple[int, ...] | list[int] | None = None,
    max_capture_tokens: int | None = None,
    disable_cudagraph: bool = False,
    decode_batch_sizes: tuple[int, ...] | list[int] | None = None,
    max_decode_batch: int = 256,
    full_mixed: bool = True,
    verify_cudagraphs: bool = False,
    scheduler: SchedulerConfig | None = None,
) -> GraphConfig:
    """Fill the "auto" values of a GraphConfig once."""
    scheduler = scheduler or SchedulerConfig()
    if disable_cudagraph:
        piecewise_cudagraph = "none"
    piecewise_cudagraph = piecewise_cudagraph or "breakable"
    max_tokens = max_capture_tokens or scheduler.max_num_batched_tokens
    if capture_sizes is None:
        sizes = default_capture_sizes(max_tokens)
    else:
        sizes = tuple(sorted(set(int(s) for s in capture_sizes)))
        max_tokens = max(sizes) if sizes else max_tokens
    if decode_batch_sizes is None:
        decode_sizes = default_decode_batch_sizes(min(max_decode_batch, scheduler.max_num_seqs))
    else:
        decode_sizes = tuple(sorted(set(int(s) for s in decode_batch_sizes)))
    return GraphConfig(
        piecewise_cudagraph=piecewise_cudagraph,
        piecewise_compiler=piecewise_compiler,
        capture_sizes=sizes if piecewise_cudagraph != "none" else (),
        max_capture_tokens=max_tokens,
        full_decode=not disable_cudagraph,
        decode_batch_sizes=decode_sizes if not disable_cudagraph else (),
        full_mixed=full_mixed and not disable_cudagraph and bool(sizes),
        verify_cudagraphs=verify_cudagraphs,
    )


LORA_BACKENDS = ("triton", "torch")


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving. Off unless `max_loras` > 0; build it through `resolve_lora_config`."""

    max_loras: int = 0  # adapters on the device at once (slots allocated at startup)
    max_lora_rank: int = 16
    max_cpu_loras: int = 0  # adapters kept on the CPU (at least max_loras)
    backend: str = "torch"  # triton (CUDA, or CPU under TRITON_INTERPRET=1) | torch

    def __post_init__(self) -> None:
        if self.max_loras < 0 or self.max_lora_rank <= 0:
            raise ValueError(
                f"max_loras must be >= 0 and max_lora_rank positive, got {self.max_loras} "
                f"and {self.max_lora_rank}"
            )
        if self.backend not in LORA_BACKENDS:
            raise ValueError(f"lora backend must be one of {LORA_BACKENDS}, got {self.backend!r}")

    @property
    def enabled(self) -> bool:
        return self.max_loras > 0


def resolve_lora_config(
    *,
    enable_lora: bool,
    max_loras: int,
    max_lora_rank: int,
    max_cpu_loras: int | None,
    backend: str,
    on_cuda: bool,
) -> LoRAConfig:
    if not enable_lora:
        return LoRAConfig()
    if backend == "auto":
        backend = "triton" if on_cuda else "torch"
    if backend == "torch" and on_cuda:
        raise ValueError(
            "lora_backend='torch' plans on the host and cannot run inside CUDA graphs: use "
            "'triton' (or 'auto') on CUDA"
        )
    return LoRAConfig(max_loras, max_lora_rank, max(max_cpu_loras or 0, max_loras), backend)


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism: one worker process per GPU, every rank running the same batches."""

    tensor_parallel_size: int = 1
    # A collective, a worker start-up step or a reply that takes longer fails the engine with
    # a clear error instead of hanging (the bound on detecting a hung worker).
    distributed_timeout_s: float = 120.0
    # Small all-reduces over NVLink peer memory where every rank can (distributed/
    # custom_all_reduce.py); off by default: no faster than NCCL inside decode graphs (2 x H200).
    custom_all_reduce: bool = False
    # Decode batches' all-reduce + residual add + RMSNorm in one kernel over peer memory
    # (distributed/fused_all_reduce.py), where every rank can.
    fused_all_reduce_add_norm: bool = True

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.distributed_timeout_s <= 0:
            raise ValueError(
                f"distributed_timeout_s must be positive, got {self.distributed_timeout_s}"
            )


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine instance runs with."""

    model: str
    model_config: ModelConfig
    dtype: str
    device: str
    load_format: str = "auto"  # auto (safetensors) | dummy (random weights, fixed seed)
    seed: int = 0
    attention_backend: str = "torch"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    graph: GraphConfig = field(default_factory=lambda: GraphConfig(piecewise_cudagraph="none"))
    tokenizer: str | None = None  # a tokenizer folder other than the model's
    # Request defaults from generation_config.json (SamplingParams field -> value).
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Launch step N+1 before reading step N's tokens (tesela/engine/llm_engine.py).
    overlap_schedule: bool = False

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)
