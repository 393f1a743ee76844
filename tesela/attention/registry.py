"""Attention backends by name, imported lazily (an optional dependency is only needed when its
backend is picked)."""

from __future__ import annotations

import importlib

from tesela.attention.base import AttentionBackend, AttentionLayout
from tesela.engine.kv_cache import KVCachePool

_BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("tesela.attention.torch_backend", "TorchAttentionBackend"),
    "triton": ("tesela.attention.triton_backend", "TritonAttentionBackend"),
}


def backend_class(name: str) -> type[AttentionBackend]:
    try:
        module_name, class_name = _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention backend {name!r}: choose one of {', '.join(sorted(_BACKENDS))}"
        ) from None
    return getattr(importlib.import_module(module_name), class_name)


def create_backend(name: str, layout: AttentionLayout, kv_cache: KVCachePool) -> AttentionBackend:
    return backend_class(name)(layout, kv_cache)
