"""The planner: the one call that turns a batch into its `ForwardPlan`.

Every pass of every runner (warmup, each capture size, each replay, each eager forward) calls
`planner.plan(batch)` for the batch it runs; nothing else builds batch-dependent state. A plan
holds the attention metadata and, with LoRA on, the batch's adapter segments (written into the
LoRA manager's persistent buffers by the same call); collective state will be a further part of
`ForwardPlan` (tesela/core/plan.py), produced here too.
"""

from __future__ import annotations

from tesela.attention.base import AttentionBackend
from tesela.core.forward_batch import ForwardBatch
from tesela.core.plan import ForwardPlan
from tesela.lora.manager import LoRAManager
from tesela.lora.state import StaleLoRAStateError


class ForwardPlanner:
    """Plans batches for eager and piecewise passes: metadata allocated per batch."""

    def __init__(self, attn_backend: AttentionBackend, lora: LoRAManager | None = None) -> None:
        self.attn_backend = attn_backend
        self.lora = lora

    def plan(self, batch: ForwardBatch) -> ForwardPlan:
        return ForwardPlan(batch.stamp, self.attn_backend.plan(batch), lora=self._lora(batch))

    def _lora(self, batch: ForwardBatch, style: str | None = None):
        # Always planned when LoRA is on, adapters or not: a batch without adapters is all
        # slot -1 tokens (zero-length work), so graphs captured on it serve every batch.
        return self.lora.plan(batch, style) if self.lora is not None else None

    def check_replay(self, plan: ForwardPlan, batch: ForwardBatch, where: str) -> None:
        """Before a FULL graph replays `batch` (no host code runs inside the graph, so no op
        can check then): the plan is this batch's, has a LoRA part when the model has LoRA
        layers, and its persistent buffers still hold it."""
        plan.check(batch, where)
        if self.lora is not None and plan.lora is None:
            raise StaleLoRAStateError(
                f"{where} of {batch.stamp} has a plan with no LoRA part: the graph would read "
                "the LoRA buffers of the last batch planned; plan the LoRA part of every replay"
            )


class CudaGraphPlanner(ForwardPlanner):
    """Plans batches for FULL graphs: the metadata views the backend's persistent buffers, which
    each call rewrites with the batch (the captured graph reads them at replay)."""

    def __init__(
        self,
        attn_backend: AttentionBackend,
        max_batch_size: int,
        max_blocks_per_seq: int,
        lora: LoRAManager | None = None,
    ) -> None:
        if not attn_backend.supports_cuda_graph:
            raise ValueError(
                f"attention backend {attn_backend.name!r} cannot run in FULL decode graphs: "
                "use the triton backend or turn FULL decode graphs off"
            )
        super().__init__(attn_backend, lora)
        attn_backend.init_cuda_graph_state(max_batch_size, max_blocks_per_seq)

    def plan(self, batch: ForwardBatch) -> ForwardPlan:
        metadata = self.attn_backend.plan_cuda_graph(batch)
        return ForwardPlan(batch.stamp, metadata, lora=self._lora(batch))
