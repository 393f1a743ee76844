"""The attention backend interface: `plan` a batch into metadata, `forward` with it.

Backends are stateless about batches: `plan(batch)` returns metadata stamped with the batch
and the planner (tesela/executor/planner.py) puts it in the batch's `ForwardPlan`; `forward`
receives it from the forward context. Backends that serve FULL decode CUDA graphs also keep
persistent buffers (`init_cuda_graph_state`) that `plan_cuda_graph(batch)` brings the batch into
(one device copy of its pack) and the graph's first op (`decode_graph_prologue`) derives the
rest from, on the device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from tesela.attention.policy import GraphSupport
from tesela.core.forward_batch import ForwardBatch
from tesela.core.kv_cache import KVCachePool, KVStoreTarget, pool_pointers
from tesela.core.plan import AttentionMetadata, StaleMetadataError

__all__ = [
    "AttentionBackend",
    "AttentionLayout",
    "AttentionMetadata",
    "KVStoreTarget",
    "SplitReplay",
    "StaleMetadataError",
]


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
class SplitReplay:
    """What every attention call of one breakable piecewise replay shares: the batch, its
    metadata and the count of real tokens (the captured tensors are padded past it). Built once
    per replay by `prepare_split_replay`, after the plan was checked against the batch."""

    batch: ForwardBatch
    metadata: AttentionMetadata
    num_tokens: int


class AttentionBackend(ABC):
    """One attention implementation over the paged KV pool.

    Subclasses implement `plan` (build metadata for a batch on the host side) and `forward`
    (store the new tokens' K/V in the pool, then attend). `cuda_graph_support` declares how much
    CUDA graph the backend can live in (the same level as its row of the policy table):
    FULL_DECODE backends implement `init_cuda_graph_state`, `plan_cuda_graph` and
    `decode_graph_prologue`; ALWAYS backends also `init_mixed_graph_state`, `plan_mixed_graph`
    and `mixed_graph_prologue` (any batch in a FULL graph).
    """

    name: ClassVar[str]
    cuda_graph_support: ClassVar[GraphSupport] = GraphSupport.PIECEWISE
    # Reads the new tokens' K/V from the pool only (never from the k/v it is given), so the
    # rotary kernel may store them there and the attention call skip its store: one launch
    # fewer per layer, and in breakable piecewise replay a split call of one launch.
    fuses_kv_store: ClassVar[bool] = False

    @property
    def supports_cuda_graph(self) -> bool:
        """Can run inside a FULL decode graph."""
        return self.cuda_graph_support >= GraphSupport.FULL_DECODE

    @property
    def supports_full_mixed(self) -> bool:
        """Can run any batch (extend, mixed) inside a FULL graph."""
        return self.cuda_graph_support >= GraphSupport.ALWAYS

    def __init__(self, layout: AttentionLayout, kv_cache: KVCachePool) -> None:
        self.layout = layout
        self.kv_cache = kv_cache
        # What `kv_store_target` hands out: the pools' addresses, rewritten in place by
        # `bind_kv_pool`, so kernels captured on the provisional pool follow the real one.
        self._pool_pointers = None
        if self.fuses_kv_store:
            self._pool_pointers = pool_pointers(kv_cache).to(layout.device)

    def bind_kv_pool(self, kv_cache: KVCachePool) -> None:
        """Point the backend at the real pool once startup has sized it (ModelRunner)."""
        self.kv_cache = kv_cache
        if self._pool_pointers is not None:
            self._pool_pointers.copy_(pool_pointers(kv_cache))

    @abstractmethod
    def plan(self, batch: ForwardBatch) -> AttentionMetadata:
        """Build this backend's metadata for `batch` (host-side work, may allocate)."""

    def init_cuda_graph_state(self, max_batch_size: int, max_blocks_per_seq: int) -> None:
        raise ValueError(f"attention backend {self.name!r} cannot run in FULL decode graphs")

    def plan_cuda_graph(self, batch: ForwardBatch) -> AttentionMetadata:
        """Bring the decode `batch` into the persistent buffers a FULL decode graph reads
        (without waiting for the device); return metadata viewing them."""
        raise ValueError(f"attention backend {self.name!r} cannot run in FULL decode graphs")

    def decode_graph_prologue(
        self, rows: int, token_rows: torch.Tensor, fed_tokens: torch.Tensor
    ) -> Callable[[], None]:
        """The first op a FULL decode graph of `rows` rows captures: whatever `plan_cuda_graph`
        leaves to the device, and the batch's tokens into `token_rows` ([3, max_tokens] int64
        static token buffers the model reads; fed ids from `fed_tokens`, the in-flight step's
        sampled tokens), padded up to `rows`."""
        raise ValueError(f"attention backend {self.name!r} cannot run in FULL decode graphs")

    def decode_pack_buffer(self) -> torch.Tensor | None:
        """The persistent buffer FULL decode graphs read a batch's pack from, if any: a batch
        built into it (`ForwardBatch.build(into=...)`) is planned without a copy."""
        return None

    def init_mixed_graph_state(
        self, max_rows: int, max_blocks_per_seq: int, max_num_tokens: int
    ) -> None:
        raise self._no_mixed_graphs()

    def plan_mixed_graph(
        self, batch: ForwardBatch, padded_num_tokens: int, split_decode: bool = True
    ) -> AttentionMetadata:
        """Bring `batch` into the persistent buffers a FULL mixed graph reads (without waiting
        for the device); return metadata viewing them."""
        raise self._no_mixed_graphs()

    def mixed_graph_prologue(
        self, padded_num_tokens: int, split_decode: bool, token_rows: torch.Tensor
    ) -> Callable[[], None]:
        """The first op a FULL mixed graph captures: whatever `plan_mixed_graph` leaves to the
        device, and the batch's tokens into `token_rows` ([3, max_tokens] int64 static token
        buffers the model reads), padded up to the graph's size."""
        raise self._no_mixed_graphs()

    def _no_mixed_graphs(self) -> ValueError:
        return ValueError(
            f"attention backend {self.name!r} cannot run extend or mixed batches inside a FULL "
            f"graph (it declares {self.cuda_graph_support.name}): use piecewise graphs"
        )

    def kv_store_target(self, layer_id: int, batch: ForwardBatch) -> KVStoreTarget | None:
        """Where the kernel before attention may store layer `layer_id`'s new K/V for `batch`
        (whose `out_cache_loc` a graph reads from its static buffers), or None: the attention
        call stores them. A layer that stored them passes `kv_stored=True` to attention."""
        if not self.fuses_kv_store:  # the backend stores K/V itself
            return None
        return KVStoreTarget(self._pool_pointers, layer_id, batch.out_cache_loc)

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
        kv_stored: bool = False,
    ) -> None:
        """q/out: [num_tokens, heads*head_dim]; k/v: [num_tokens, kv_heads*head_dim]. Stores
        k/v in the pool first, unless `kv_stored` (the rotary kernel did, at `kv_store_target`)."""

    # Breakable piecewise replay: split calls bound at capture ---------------------------------

    def prepare_split_replay(self, batch: ForwardBatch, metadata: AttentionMetadata) -> SplitReplay:
        """Once per replay: what every layer's bound call reads (backends add launch values)."""
        return SplitReplay(batch, metadata, batch.num_tokens)

    def bind_split(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        layer_id: int,
        kv_stored: bool = False,
    ) -> Callable[[SplitReplay], None]:
        """The attention call of one layer at one captured size, its tensors bound (they are
        the captured ones, padded to the size). The default slices them per call and runs
        `forward`; a backend may bind its kernel launches instead (the Triton backend does)."""

        def call(replay: SplitReplay) -> None:
            n = replay.num_tokens  # only the real tokens are stored and attended
            self.forward(
                q[:n], k[:n], v[:n], out[:n], layer_id, replay.batch, replay.metadata, kv_stored
            )

        return call

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, layer_id: int, batch: ForwardBatch):
        layout = self.layout
        shape = (-1, layout.num_kv_heads, layout.head_dim)
        loc = batch.out_cache_loc[: k.shape[0]]
        self.kv_cache.k_buffers[layer_id].index_copy_(0, loc, k.view(shape))
        self.kv_cache.v_buffers[layer_id].index_copy_(0, loc, v.view(shape))
