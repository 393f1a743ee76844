"""The per-batch plan: everything a forward needs that depends on the batch, built by one call.

`ForwardPlanner.plan(batch)` (tesela/executor/planner.py) is the only producer. The plan travels
with its batch into the forward context (tesela/core/forward_context.py); attention backends keep
no per-batch state of their own. Every part of a plan carries the stamp of the batch it was
planned for, and `ForwardPlan.check(batch)` refuses any other batch, so a pass that runs with a
plan made for another batch (another size, another mode, the warmup's) fails loudly instead of
computing garbage. This is the metadata invariant of docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tesela.core.forward_batch import BatchStamp, ForwardBatch


class StaleMetadataError(RuntimeError):
    """A forward ran with a plan made for another batch."""


@dataclass
class AttentionMetadata:
    """Base class of every attention backend's per-batch metadata."""

    stamp: BatchStamp


class PlanPart(Protocol):
    """A batch-dependent part of a plan (LoRA segments, collective state): stamped with the batch
    it was planned for. A part whose device state lives in persistent buffers (what captured
    graphs read) also says whether those buffers still hold its batch: a later plan rewrites
    them, and replaying an older plan would read another batch's state."""

    stamp: BatchStamp

    def check_current(self, where: str) -> None:
        """Raise StaleMetadataError if the persistent buffers now hold another batch."""


@dataclass(frozen=True, slots=True)
class ForwardPlan:
    """One batch's plan. Extension slots stay None until their feature plans them: a new
    batch-dependent input is a new slot here, filled by the planner, never state on a layer."""

    stamp: BatchStamp
    attn_metadata: AttentionMetadata
    lora: PlanPart | None = None  # multi-LoRA: segments (tesela/lora/manager.py)
    collective: PlanPart | None = None  # tensor parallelism: per-batch collective state

    def __post_init__(self) -> None:
        for name in ("attn_metadata", "lora", "collective"):
            part = getattr(self, name)
            if part is not None and part.stamp != self.stamp:
                raise StaleMetadataError(
                    f"the {name} part of a plan for {self.stamp} was planned for {part.stamp}: "
                    "every part of a plan must come from the same planning call"
                )

    def check(
        self, batch: ForwardBatch, where: str = "attention", replayed: ForwardPlan | None = None
    ) -> None:
        """Raise unless this plan was made for `batch` (what the forward context runs) and the
        persistent buffers still hold it.

        `replayed`: the plan of the batch a FULL graph is replaying. Only the CPU stand-in runs
        this code then (it re-runs the captured forward, with the capture plan): the buffers
        must hold the replayed batch, whose plan the runner checked before the replay, as on a
        GPU, where no host code runs inside the graph."""
        stamp = batch.stamp
        if self.stamp != stamp:
            raise StaleMetadataError(
                f"{where} ran {stamp} with a plan made for {self.stamp}: plan every pass "
                "(warmup, each capture size, each replay) with planner.plan(batch) for the "
                "batch being run"
            )
        (self if replayed is None else replayed).check_current(where)

    def check_current(self, where: str) -> None:
        """Raise if a part's persistent buffers now hold another batch (planned since)."""
        for part in (self.lora, self.collective):
            if part is not None:
                part.check_current(where)
