"""The LoRA manager: device slots, the CPU adapter cache, and the per-batch LoRA state.

`max_loras` device slots hold stacked A/B weights per target module, allocated once when the
engine starts (so their memory is taken before the KV pool is sized). More adapters (up to
`max_cpu_loras`) wait on the CPU; a batch's adapters are swapped into slots on demand, evicting
the least recently used slot that the batch does not need. Slot -1 is the base model.

`plan(batch)` makes the LoRA part of the batch's `ForwardPlan` (called by the planner,
tesela/executor/planner.py, in the same call as the attention metadata): it maps the batch's
rows to slots, merges consecutive tokens of one adapter into segments and writes them into
persistent device buffers (what the kernels and captured graphs read), stamped with the batch's
identity. `LoRABatchState.check_current` refuses a plan whose buffers a later plan rewrote.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tesela.core.forward_batch import BatchStamp, ForwardBatch
from tesela.lora import layer  # noqa: F401  (registers torch.ops.tesela.lora_linear)
from tesela.lora.adapter import LoRAAdapter, LoRATarget, load_adapter, lora_targets
from tesela.lora.kernels import GATHER, SGMV
from tesela.lora.request import LoRARequest
from tesela.lora.state import NO_SLOT, LoRABatchState, LoRABuffers

logger = logging.getLogger("tesela.lora")


@dataclass
class LoRASlots:
    """Which adapter id each slot holds, in least-recently-used order."""

    max_loras: int
    by_id: OrderedDict = field(default_factory=OrderedDict)  # lora id -> slot

    def assign(self, needed: list[int]) -> list[tuple[int, int]]:
        """Slots for every id in `needed`; returns the (id, slot) pairs that must be loaded."""
        if len(set(needed)) > self.max_loras:
            raise ValueError(
                f"a batch needs {len(set(needed))} adapters but only max_loras="
                f"{self.max_loras} fit on the device at once"
            )
        loads = []
        for lora_id in needed:
            if lora_id in self.by_id:
                self.by_id.move_to_end(lora_id)
                continue
            used = set(self.by_id.values())
            free = [s for s in range(self.max_loras) if s not in used]
            if free:
                slot = free[0]
            else:
                victim = next(i for i in self.by_id if i not in needed)
                slot = self.by_id.pop(victim)
            self.by_id[lora_id] = slot
            loads.append((lora_id, slot))
        return loads

    def evict(self, lora_id: int) -> int | None:
        return self.by_id.pop(lora_id, None)


class LoRAManager:
    def __init__(
        self,
        model: nn.Module,
        *,
        max_loras: int,
        max_lora_rank: int,
        max_cpu_loras: int,
        max_num_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
        backend: str,
        base_linear: Callable[..., torch.Tensor] = torch.nn.functional.linear,
    ) -> None:
        """`base_linear(x, weight, bias)`: the GEMM a LoRA layer runs before adding its delta
        where the delta is not fused into it (the model runner passes tesela/layers/gemv.py's,
        which takes the small-M GEMV where tuned)."""
        if max_loras <= 0 or max_lora_rank <= 0:
            raise ValueError("max_loras and max_lora_rank must be positive to enable LoRA")
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max(max_cpu_loras, max_loras)
        self.device, self.dtype, self.backend = device, dtype, backend
        self.base_linear = base_linear
        self.targets: dict[str, LoRATarget] = lora_targets(model)
        self.buffers = LoRABuffers.allocate(max_num_tokens, max_loras, device)
        self.slots = LoRASlots(max_loras)
        self.requests: dict[int, LoRARequest] = {}  # every registered adapter, by id
        self.names: dict[str, int] = {}
        self.adapters: OrderedDict[int, LoRAAdapter] = OrderedDict()  # CPU cache, LRU order
        self.buffer_stamp: BatchStamp | None = None  # whose state the buffers hold
        self.slot_ranks = [0] * max_loras  # host copies of buffers.ranks / scalings
        self.slot_scalings = [0.0] * max_loras
        self.modules = {name: model.get_submodule(name) for name in self.targets}
        self.nbytes = sum(self._attach(self.modules[n], t) for n, t in self.targets.items())
        logger.info(
            "LoRA: %d slots of rank %d on %d modules (%.1f MiB)",
            max_loras,
            max_lora_rank,
            len(self.targets),
            self.nbytes / 2**20,
        )

    def _attach(self, module: nn.Module, target: LoRATarget) -> int:
        slices = len(target.slices)
        a = torch.zeros(
            self.max_loras, slices, self.max_lora_rank, target.in_features,
            dtype=self.dtype, device=self.device,
        )  # fmt: skip
        b = torch.zeros(
            self.max_loras, target.out_features, self.max_lora_rank,
            dtype=self.dtype, device=self.device,
        )  # fmt: skip
        module.attach_lora(a, b, target.slice_offsets)
        return a.nbytes + b.nbytes

    # ---- adapters ------------------------------------------------------------------------

    def add_adapter(self, request: LoRARequest) -> LoRAAdapter:
        """Register an adapter, loading and validating it (raises for one that does not fit).

        Registered adapters stay known by id; the CPU cache keeps the `max_cpu_loras` most
        recently used and reads an evicted one from disk again when a batch needs it."""
        known = self.requests.get(request.lora_int_id)
        if known is not None and known != request:
            raise ValueError(
                f"LoRA id {request.lora_int_id} is already used by adapter {known.lora_name!r}"
            )
        named = self.names.get(request.lora_name)
        if named is not None and named != request.lora_int_id:
            raise ValueError(f"a LoRA adapter named {request.lora_name!r} is already loaded")
        adapter = self._cpu_adapter(request)
        self.requests[request.lora_int_id] = request
        self.names[request.lora_name] = request.lora_int_id
        return adapter

    def _cpu_adapter(self, request: LoRARequest) -> LoRAAdapter:
        adapter = self.adapters.get(request.lora_int_id)
        if adapter is None:
            adapter = load_adapter(request, self.targets, self.max_lora_rank)
            while len(self.adapters) >= self.max_cpu_loras:
                self.adapters.popitem(last=False)  # slots keep their own copy on the device
            self.adapters[request.lora_int_id] = adapter
        self.adapters.move_to_end(request.lora_int_id)
        return adapter

    def remove_adapter(self, lora_id: int) -> None:
        request = self.requests.pop(lora_id, None)
        if request is None:
            raise KeyError(f"no LoRA adapter with id {lora_id} is loaded")
        self.names.pop(request.lora_name, None)
        self.adapters.pop(lora_id, None)
        slot = self.slots.evict(lora_id)
        if slot is not None:
            self.buffers.ranks[slot] = 0
            self.slot_ranks[slot] = 0

    def _load_slot(self, lora_id: int, slot: int) -> None:
        adapter = self._cpu_adapter(self.requests[lora_id])
        rank = adapter.rank
        for name, module in self.modules.items():
            if name in adapter.weights:
                a, b = adapter.weights[name]
                module.lora_a[slot, :, :rank].copy_(a, non_blocking=True)
                module.lora_b[slot, :, :rank].copy_(b, non_blocking=True)
            else:  # a module this adapter leaves alone
                module.lora_a[slot].zero_()
                module.lora_b[slot].zero_()
        self.buffers.ranks[slot] = rank
        self.buffers.scalings[slot] = adapter.scaling
        self.slot_ranks[slot], self.slot_scalings[slot] = rank, adapter.scaling

    # ---- the per-batch plan --------------------------------------------------------------

    def plan(self, batch: ForwardBatch, style: str | None = None) -> LoRABatchState:
        """Slots for the batch's adapters, then segments written into the device buffers.

        `style`: the kernels the batch's graph launches, when they are fixed by the graph
        (a FULL mixed graph launches `sgmv` for every batch, decode rows too); by default
        `gather` for decode batches and `sgmv` for the rest."""
        lora_ids = tuple(batch.lora_ids) or (0,) * batch.batch_size
        missing = sorted({i for i in lora_ids if i and i not in self.requests})
        if missing:
            raise ValueError(f"LoRA adapter id(s) {missing} are not loaded: add them first")
        for lora_id, slot in self.slots.assign([i for i in dict.fromkeys(lora_ids) if i]):
            self._load_slot(lora_id, slot)
        row_slots = [self.slots.by_id[i] if i else NO_SLOT for i in lora_ids]
        segments = _segments(batch.extend_lens_cpu, row_slots)
        self.buffers.write(segments, batch.num_tokens)
        self.buffer_stamp = batch.stamp
        if style is None:
            style = GATHER if batch.mode.is_decode else SGMV
        return LoRABatchState(batch.stamp, style, segments, lora_ids, self)


def _segments(extend_lens: list[int], row_slots: list[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive tokens with one slot: rows of the same adapter side by side merge."""
    segments: list[tuple[int, int, int]] = []
    start = 0
    for n, slot in zip(extend_lens, row_slots, strict=True):
        if segments and segments[-1][2] == slot:
            segments[-1] = (segments[-1][0], start + n, slot)
        else:
            segments.append((start, start + n, slot))
        start += n
    return segments
