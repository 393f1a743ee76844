"""Build a model on the meta device, then fill its weights once on the target device.

Weights come from safetensors (one file, or shards listed in model.safetensors.index.json),
read tensor by tensor straight into the allocated parameters: no second full copy of the model
is ever held. Each checkpoint tensor arrives as a safetensors *slice* and the owning layer's
`weight_loader` reads only the part its tensor-parallel rank holds (tesela/layers/linear.py).
`load_format="dummy"` fills random weights from a fixed seed instead: the full-size tensors of
the unsharded model, generated one at a time in a fixed order and handed to the same loaders,
so every tensor-parallel size gets the same model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from tesela.config import ModelConfig
from tesela.distributed.group import SINGLE, TPGroup
from tesela.layers.linear import check_shape
from tesela.models.registry import model_class

LOAD_FORMATS = ("auto", "safetensors", "dummy")
INDEX_FILE = "model.safetensors.index.json"


def build_model(
    config: ModelConfig,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    load_format: str = "auto",
    path: str | Path | None = None,
    seed: int = 0,
    tp: TPGroup = SINGLE,
) -> nn.Module:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    cls = model_class(config)
    with torch.device("meta"):
        model = cls(config, tp)
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if load_format == "dummy":
        with torch.device("meta"):
            full_model = cls(config).to(dtype)  # the unsharded shapes, nothing allocated
        load_weights(model, dummy_weights(full_model, device, seed), fused=True)
    else:
        if path is None:
            raise ValueError("loading weights needs a model folder (or load_format='dummy')")
        load_weights(model, iterate_safetensors(Path(path)))
    model.init_buffers(device)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def dummy_weights(
    full_model: nn.Module, device: torch.device | str, seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights with a fixed seed: N(0, 0.02) matrices, norms near 1, biases small.

    `full_model` is the unsharded model on the meta device: its parameters, in sorted order,
    are generated whole one at a time, so every rank of every tensor-parallel size slices the
    same values. The spread keeps logits far from uniform, so greedy comparisons between paths
    mean something (near-ties would make them flaky)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in sorted(full_model.named_parameters()):
        tensor = torch.empty(param.shape, dtype=param.dtype, device=device)
        if name.endswith("norm.weight"):
            tensor.uniform_(0.8, 1.2, generator=generator)
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
        yield name, tensor


def safetensors_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{INDEX_FILE} in {path} lists shard(s) that are missing: {', '.join(missing)}"
            )
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {path}: tesela loads safetensors checkpoints "
            "(or use load_format='dummy' for random weights)"
        )
    return files


def iterate_safetensors(path: Path) -> Iterator[tuple[str, object]]:
    """(name, slice) for every checkpoint tensor: a slice reads nothing until indexed."""
    for file in safetensors_files(path):
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as exc:  # SafetensorError is not importable under one stable name
            raise ValueError(
                f"{file} is not a readable safetensors file ({exc}): re-download or re-save it"
            ) from exc
        with handle as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not a dict)
                yield name, f.get_slice(name)


@torch.no_grad()
def load_weights(model: nn.Module, weights: Iterator[tuple[str, object]], fused=False) -> None:
    """Fill `model` from (checkpoint name, slice or tensor) pairs. `fused=True`: the names are
    the model's own (fused `qkv_proj` / `gate_up_proj` tensors, as `dummy_weights` yields)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    stacked = getattr(model, "stacked_params", {})
    loaded: set[str] = set()
    for ckpt_name, source in weights:
        if "rotary_emb.inv_freq" in ckpt_name:
            continue
        if fused:
            for name, shard, part in _unfuse(model, ckpt_name, source):
                _load_one(model, params[name], name, part, shard, ckpt_name)
                loaded.add(f"{name}:{shard}")
            continue
        name, shard = _map_name(ckpt_name, stacked, getattr(model, "map_checkpoint_name", None))
        if name not in params:
            if model.config.tie_word_embeddings and ckpt_name == "lm_head.weight":
                continue
            raise ValueError(f"checkpoint tensor {ckpt_name!r} matches no model parameter")
        _load_one(model, params[name], name, source, shard, ckpt_name)
        loaded.add(f"{name}:{shard}")
    _check_complete(model, params, stacked, loaded)


def _load_one(model: nn.Module, param, name: str, source, shard, ckpt_name: str) -> None:
    """The owning layer reads its rank's part; a replicated parameter is read whole. Layers
    that only place whole checkpoint tensors (MoE experts: `load_shard`) get them whole."""
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    loader = getattr(owner, "weight_loader", None)
    if loader is not None:
        loader(param, source, shard, ckpt_name)
        return
    if shard is not None:
        owner.load_shard(param, source[:].to(param.device), shard)
        return
    check_shape(ckpt_name, source, tuple(param.shape))
    param.copy_(source[:])


def _unfuse(model: nn.Module, name: str, tensor: torch.Tensor):
    """A full fused tensor (e.g. qkv_proj) as its sections, each named for the loader."""
    owner = model.get_submodule(name.rsplit(".", 1)[0])
    sections = getattr(owner, "sections", None)
    if sections is None or len(sections) == 1:
        yield name, None, tensor
        return
    offset = 0
    for shard, section in sections.items():
        yield name, shard, tensor[offset : offset + section.rows]
        offset += section.rows


def _map_name(ckpt_name: str, stacked: dict[str, tuple[str, str]], model_map=None):
    """(parameter name, shard or None). A model's own `map_checkpoint_name` (MoE experts) goes
    first, then the fused-parameter fragments."""
    mapped = model_map(ckpt_name) if model_map is not None else None
    if mapped is not None:
        return mapped
    for fragment, (fused, shard) in stacked.items():
        if f".{fragment}." in ckpt_name:
            return ckpt_name.replace(f".{fragment}.", f".{fused}."), shard
    return ckpt_name, None


def _check_complete(model, params, stacked, loaded: set[str]) -> None:
    """Every parameter (every shard of a fused one) must have come from the checkpoint."""
    fused_shards: dict[str, list[tuple[str, str]]] = {}  # fused -> [(shard, checkpoint name)]
    for fragment, (fused, shard) in stacked.items():
        fused_shards.setdefault(fused, []).append((shard, fragment))
    missing = []
    for name in params:
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        owner_name, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        shards_of = getattr(model.get_submodule(owner_name), "checkpoint_shards", None)
        if shards_of is not None and f"{name}:None" not in loaded:
            # Stacked expert weights: loaded whole (fused checkpoint) or expert by expert.
            lost = [s for s in shards_of(leaf) if f"{name}:{s}" not in loaded]
            missing += [f"{owner_name}.{e}.{kind}_proj" for e, kind in lost]
            continue
        fused = next((f for f in fused_shards if f".{f}." in name), None)
        if fused is None:
            if f"{name}:None" not in loaded:
                missing.append(name)
            continue
        for shard, fragment in fused_shards[fused]:
            if f"{name}:{shard}" not in loaded:
                missing.append(name.replace(f".{fused}.", f".{fragment}."))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"the checkpoint is missing tensor(s): {', '.join(missing[:5])}{more}")
