"""PEFT LoRA adapters from disk, mapped onto tesela's (fused) projections.

A PEFT folder holds `adapter_config.json` (rank `r`, `lora_alpha`, `use_rslora`,
`target_modules`, ...) and `adapter_model.safetensors` with `...<module>.lora_A.weight`
([r, in]) and `...<module>.lora_B.weight` ([out, r]). tesela fuses q/k/v into `qkv_proj` and
gate/up into `gate_up_proj`, so a target is a fused module with one *slice* per checkpoint
projection: a slice's A maps the module's input to the rank, its B writes that slice's rows of
the output. A projection the adapter does not target keeps zero A and B (no delta).

Everything is checked against the model before an adapter is accepted: unknown or unsupported
modules, shapes that do not fit, a rank above `max_lora_rank`, PEFT features tesela does not
serve (DoRA, biases, modules_to_save, per-module rank/alpha patterns).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from tesela.lora.request import LoRARequest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The projections LoRA may target, by their checkpoint names.
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


class LoRAAdapterError(ValueError):
    """An adapter that cannot be served with this model and these limits (a user error)."""


@dataclass(frozen=True)
class LoRATarget:
    """A module of the base model that takes LoRA deltas: its input width and output slices."""

    name: str  # e.g. "model.layers.0.self_attn.qkv_proj"
    in_features: int
    slices: tuple[tuple[str, int, int], ...]  # (checkpoint projection, row offset, rows)

    @property
    def out_features(self) -> int:
        return sum(size for _, _, size in self.slices)

    @property
    def slice_offsets(self) -> tuple[int, ...]:
        return tuple(off for _, off, _ in self.slices) + (self.out_features,)


def lora_targets(model: nn.Module) -> dict[str, LoRATarget]:
    """The LoRA-capable modules of a tesela model, by module name."""
    stacked = getattr(model, "stacked_params", {})
    shards_of: dict[str, list[tuple[str, str]]] = {}  # fused -> [(shard, checkpoint name)]
    for ckpt, (fused, shard) in stacked.items():
        shards_of.setdefault(fused, []).append((shard, ckpt))
    targets = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in LORA_TARGETS:
            continue
        in_features = module.weight.shape[1]
        if leaf in shards_of:
            slices = tuple((ckpt, *module.shard_offsets[shard]) for shard, ckpt in shards_of[leaf])
        else:
            slices = ((leaf, 0, module.weight.shape[0]),)
        targets[name] = LoRATarget(name, in_features, slices)
    return targets


@dataclass
class LoRAAdapter:
    """A validated adapter on the CPU: per target, A [slices, rank, in] and B [out, rank]."""

    request: LoRARequest
    rank: int
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def name(self) -> str:
        return self.request.lora_name

    @property
    def lora_id(self) -> int:
        return self.request.lora_int_id

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def read_adapter_config(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"LoRA adapter folder {str(path)!r} does not exist")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no {CONFIG_FILE} in {path}: a LoRA adapter is a PEFT folder with {CONFIG_FILE} "
            f"and {WEIGHTS_FILE} (save it with peft's save_pretrained)"
        )
    if not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"no {WEIGHTS_FILE} in {path}: tesela reads PEFT adapters saved as safetensors"
        )
    return json.loads(config_file.read_text())


def _check_config(config: dict, where: str, max_lora_rank: int) -> tuple[int, float]:
    """The adapter's rank and scaling, after refusing what tesela does not serve."""
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAAdapterError(f"{where}: peft_type {config['peft_type']!r} is not LoRA")
    unsupported = {
        "use_dora": config.get("use_dora"),
        "bias": config.get("bias", "none") != "none",
        "modules_to_save": config.get("modules_to_save"),
        "rank_pattern": config.get("rank_pattern"),
        "alpha_pattern": config.get("alpha_pattern"),
        "lora_bias": config.get("lora_bias"),
    }
    found = [key for key, value in unsupported.items() if value]
    if found:
        raise LoRAAdapterError(
            f"{where}: tesela serves plain LoRA adapters; {', '.join(found)} in "
            f"{CONFIG_FILE} is not supported (merge such an adapter into the weights instead)"
        )
    rank = int(config["r"])
    if not 0 < rank <= max_lora_rank:
        raise LoRAAdapterError(
            f"{where}: rank r={rank} is above max_lora_rank={max_lora_rank}: start the engine "
            f"with max_lora_rank >= {rank}"
        )
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, scaling


def load_adapter(
    request: LoRARequest, targets: dict[str, LoRATarget], max_lora_rank: int
) -> LoRAAdapter:
    """Read and validate a PEFT adapter for the model whose `targets` are given."""
    path = Path(request.lora_path)
    where = f"LoRA adapter {request.lora_name!r} ({path})"
    rank, scaling = _check_config(read_adapter_config(path), where, max_lora_rank)
    tensors: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118  (safe_open is not a dict)
            match = _KEY.match(key)
            if match is None:
                raise LoRAAdapterError(f"{where}: tensor {key!r} is not a LoRA A/B weight")
            parent, module, which = match.groups()
            tensors.setdefault((parent, module), {})[which] = f.get_tensor(key).float()
    if not tensors:
        raise LoRAAdapterError(f"{where}: {WEIGHTS_FILE} holds no LoRA weights")
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for (parent, module), pair in sorted(tensors.items()):
        _place(weights, targets, where, rank, parent, module, pair)
    return LoRAAdapter(request, rank, scaling, weights)


def _place(weights, targets, where, rank, parent, module, pair) -> None:
    """Put one projection's A and B into its fused target's slice."""
    if module not in SUPPORTED_MODULES:
        raise LoRAAdapterError(
            f"{where}: targets {parent}.{module}; tesela serves LoRA on "
            f"{', '.join(SUPPORTED_MODULES)} only"
        )
    if set(pair) != {"A", "B"}:
        raise LoRAAdapterError(f"{where}: {parent}.{module} lacks its lora_A or lora_B weight")
    target = next(
        (t for n, t in targets.items() if n.rsplit(".", 1)[0] == parent and _has(t, module)),
        None,
    )
    if target is None:
        raise LoRAAdapterError(
            f"{where}: module {parent}.{module} does not exist in the base model (an adapter "
            "for another model?)"
        )
    index = [s[0] for s in target.slices].index(module)
    _, offset, size = target.slices[index]
    a, b = pair["A"], pair["B"]
    expected_a, expected_b = (rank, target.in_features), (size, rank)
    if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
        raise LoRAAdapterError(
            f"{where}: {parent}.{module} has lora_A {tuple(a.shape)} and lora_B "
            f"{tuple(b.shape)}; the base model needs {expected_a} and {expected_b} (is the "
            "adapter for this model?)"
        )
    if target.name not in weights:
        num_slices = len(target.slices)
        weights[target.name] = (
            torch.zeros(num_slices, rank, target.in_features),
            torch.zeros(target.out_features, rank),
        )
    stacked_a, stacked_b = weights[target.name]
    stacked_a[index].copy_(a)
    stacked_b[offset : offset + size].copy_(b)


def _has(target: LoRATarget, module: str) -> bool:
    return any(s[0] == module for s in target.slices)


def write_random_adapter(
    path: str | Path,
    model_config,
    *,
    rank: int,
    seed: int,
    modules: tuple[str, ...] = SUPPORTED_MODULES,
) -> Path:
    """Write a PEFT-format adapter with random A and B for a model shape (benchmarks and GPU
    tests on preset models, which have no checkpoint for peft to wrap). A ~ N(0, 1/in) and
    B ~ N(0, 0.02^2) with alpha = 2 * rank, so the deltas visibly change the outputs."""
    from safetensors.torch import save_file

    mc = model_config
    h, i = mc.hidden_size, mc.intermediate_size
    shapes = {  # (out, in) of each projection
        "q_proj": (mc.q_size, h),
        "k_proj": (mc.kv_size, h),
        "v_proj": (mc.kv_size, h),
        "o_proj": (h, mc.q_size),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(mc.num_hidden_layers):
        for module in modules:
            out_features, in_features = shapes[module]
            parent = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            a = torch.randn(rank, in_features, generator=generator) * in_features**-0.5
            b = torch.randn(out_features, rank, generator=generator) * 0.02
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_FILE))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(modules),
        "bias": "none",
    }
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return path
