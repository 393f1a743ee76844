"""The planner: the one call that turns a batch into its `ForwardPlan`.

Every pass of every runner (warmup, each capture size, each replay, each eager forward) calls
`planner.plan(batch)` for the batch it runs; nothing else builds batch-dependent state. Today a
plan holds the attention metadata; multi-LoRA segments and collective state are further parts
of `ForwardPlan` (tesela/core/plan.py), produced here by the same call.
"""

from __future__ import annotations

from tesela.attention.base import AttentionBackend
from tesela.core.forward_batch import ForwardBatch
from tesela.core.plan import ForwardPlan


class ForwardPlanner:
    """Plans batches for eager and piecewise passes: metadata allocated per batch."""

    def __init__(self, attn_backend: AttentionBackend) -> None:
        self.attn_backend = attn_backend

    def plan(self, batch: ForwardBatch) -> ForwardPlan:
        return ForwardPlan(batch.stamp, self.attn_backend.plan(batch))


class CudaGraphPlanner(ForwardPlanner):
    """Plans batches for FULL graphs: the metadata views the backend's persistent buffers, which
    each call rewrites with the batch (the captured graph reads them at replay)."""

    def __init__(
        self, attn_backend: AttentionBackend, max_batch_size: int, max_blocks_per_seq: int
    ) -> None:
        if not attn_backend.supports_cuda_graph:
            raise ValueError(
                f"attention backend {attn_backend.name!r} cannot run in FULL decode graphs: "
                "use the triton backend or turn FULL decode graphs off"
            )
        super().__init__(attn_backend)
        attn_backend.init_cuda_graph_state(max_batch_size, max_blocks_per_seq)

    def plan(self, batch: ForwardBatch) -> ForwardPlan:
        return ForwardPlan(batch.stamp, self.attn_backend.plan_cuda_graph(batch))
