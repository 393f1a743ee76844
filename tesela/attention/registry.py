"""Attention backends by name, imported lazily (an optional dependency is only needed when its
backend is picked), and their declared support (`BackendSpec`, from the policy table).

Which backend runs is decided by `tesela.attention.policy.resolve_attention`; this module only
builds the one decided. A backend whose package is missing raises `BackendUnavailableError`
(an ImportError) saying how to install it and what the policy runs instead.
"""

from __future__ import annotations

import importlib
import importlib.util

from tesela.attention.base import AttentionBackend, AttentionLayout
from tesela.attention.policy import (
    AUTO,
    BACKEND_SPECS,
    BackendSpec,
    package_importable,
    parse_request,
    unavailable_message,
)
from tesela.core.kv_cache import KVCachePool

# name -> (module, class). A backend in BACKEND_SPECS whose module is not written yet (FlashInfer)
# is still listed: adding its adapter is then one file.
_BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("tesela.attention.torch_backend", "TorchAttentionBackend"),
    "triton": ("tesela.attention.triton_backend", "TritonAttentionBackend"),
    "flashinfer": ("tesela.attention.flashinfer_backend", "FlashInferAttentionBackend"),
}


class BackendUnavailableError(ImportError):
    """The backend's package or adapter is not installed here; the message says what to do."""


def backend_names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def backend_spec(name: str) -> BackendSpec:
    """What backend `name` declares it supports (devices, capability, dtypes, graphs, ...)."""
    if name == AUTO:
        raise ValueError(
            "'auto' is not a backend: resolve it with tesela.attention.policy.resolve_attention"
        )
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}: choose one of {', '.join(_BACKENDS)}"
        )
    return BACKEND_SPECS[name]


def adapter_available(name: str) -> bool:
    """True when tesela has the adapter module of backend `name` (its package aside)."""
    return importlib.util.find_spec(_BACKENDS[name][0]) is not None


def backend_class(name: str) -> type[AttentionBackend]:
    spec = backend_spec(parse_request(name)[0])
    if spec.package is not None and not package_importable(spec.package):
        raise BackendUnavailableError(unavailable_message(spec.name))
    module_name, class_name = _BACKENDS[spec.name]
    if not adapter_available(spec.name):
        raise BackendUnavailableError(
            f"attention backend {spec.name!r} has no adapter in this tesela build "
            f"({module_name} is missing); its support is declared in tesela.attention.policy "
            "so that the adapter is one file. Use --attention-backend auto meanwhile."
        )
    return getattr(importlib.import_module(module_name), class_name)


def create_backend(name: str, layout: AttentionLayout, kv_cache: KVCachePool) -> AttentionBackend:
    """Build backend `name` ("triton", or "flashinfer:fa2" as AttentionDecision.name gives)."""
    backend, variant = parse_request(name)
    spec = backend_spec(backend)
    cls = backend_class(backend)
    if getattr(cls, "variants", ()):  # adapters with kernel paths take the resolved one
        return cls(layout, kv_cache, variant=variant or spec.default_variant)
    if variant not in (None, spec.default_variant):
        raise ValueError(
            f"{cls.__name__} implements only its default path ({spec.default_variant}), "
            f"not {variant!r}: ask for {backend!r} alone"
        )
    return cls(layout, kv_cache)
