"""The attention backend interface and the stamped metadata that guards it.

The metadata invariant (DESIGN.md §3): every execution of the model runs with metadata that
`init_forward_metadata(batch)` built for that very batch. Metadata carries the stamp of the
batch it was planned for, and `metadata_for(batch)` refuses any other batch with an error that
names both, so a runner that forgets to plan (or plans for the wrong size or mode) fails loudly
instead of computing garbage.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from tesela.engine.kv_cache import KVCachePool
from tesela.executor.forward_batch import BatchStamp, ForwardBatch


class StaleMetadataError(RuntimeError):
    """Attention ran with metadata planned for another batch (or none at all)."""


@dataclass(frozen=True)
class AttentionLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    dtype: torch.dtype
    device: torch.device
    sliding_window: int | None = None
    # The layers that use `sliding_window` (None: every layer); the others attend fully.
    sliding_window_layers: frozenset[int] | None = None

    def window(self, layer_id: int) -> int | None:
        """The sliding window of layer `layer_id` (None: full causal attention)."""
        if self.sliding_window_layers is None or layer_id in self.sliding_window_layers:
            return self.sliding_window
        return None


@dataclass
class AttentionMetadata:
    """Base class of every backend's per-batch metadata."""

    stamp: BatchStamp


class AttentionBackend(ABC):
    """One attention implementation over the paged KV pool.

    Subclasses implement `plan` (build metadata for a batch on the host side) and `forward`
    (store the new tokens' K/V in the pool, then attend). Backends that serve FULL decode graphs
    also implement the `*_cuda_graph` hooks, keeping their metadata in persistent buffers.
    """

    name: ClassVar[str]

    def __init__(self, layout: AttentionLayout, kv_cache: KVCachePool) -> None:
        self.layout = layout
        self.kv_cache = kv_cache
        self.forward_metadata: AttentionMetadata | None = None

    def init_forward_metadata(self, batch: ForwardBatch) -> AttentionMetadata:
        metadata = self.plan(batch)
        if metadata.stamp != batch.stamp:
            raise AssertionError(f"{type(self).__name__}.plan stamped {metadata.stamp}")
        self.forward_metadata = metadata
        return metadata

    def metadata_for(self, batch: ForwardBatch) -> AttentionMetadata:
        """The current metadata, checked against the batch being run."""
        metadata = self.forward_metadata
        if metadata is None:
            raise StaleMetadataError(
                f"{self.name} attention ran {batch.stamp} but no metadata was planned: call "
                "attn_backend.init_forward_metadata(batch) before running the model"
            )
        if metadata.stamp != batch.stamp:
            raise StaleMetadataError(
                f"{self.name} attention ran {batch.stamp} with {type(metadata).__name__} "
                f"planned for {metadata.stamp}: call attn_backend.init_forward_metadata(batch) "
                "for the batch being run (warmup, capture and replay included)"
            )
        return metadata

    @abstractmethod
    def plan(self, batch: ForwardBatch) -> AttentionMetadata:
        """Build this backend's metadata for `batch` (host-side work, may allocate)."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        layer_id: int,
        batch: ForwardBatch,
        metadata: AttentionMetadata,
    ) -> None:
        """q/out: [num_tokens, heads*head_dim]; k/v: [num_tokens, kv_heads*head_dim]."""

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, layer_id: int, batch: ForwardBatch):
        layout = self.layout
        shape = (-1, layout.num_kv_heads, layout.head_dim)
        loc = batch.out_cache_loc[: k.shape[0]]
        self.kv_cache.k_buffers[layer_id].index_copy_(0, loc, k.view(shape))
        self.kv_cache.v_buffers[layer_id].index_copy_(0, loc, v.view(shape))
