"""The LoRA manager: device slots, the CPU adapter cache, and the per-batch LoRA state.

`max_loras` device slots hold stacked A/B weights per target module, allocated once when the
engine starts (so their memory is taken before the KV pool is sized). More adapters (up to
`max_cpu_loras`) wait on the CPU; a batch's adapters are swapped into slots on demand, evicting
the least recently used slot that the batch does not need. Slot -1 is the base model.

`plan(batch)` is the LoRA half of the per-batch plan: it maps the batch's rows to slots,
merges consecutive tokens of one adapter into segments and writes them into persistent device
buffers (what the kernels and captured graphs read), stamped with the batch's identity.
`state_for(batch)` refuses to run a batch whose LoRA state was planned for another one.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from tesela.executor.forward_batch import BatchStamp, ForwardBatch
from tesela.lora.adapter import LoRAAdapter, LoRATarget, load_adapter, lora_targets
from tesela.lora.kernels import GATHER, SGMV
from tesela.lora.request import LoRARequest

logger = logging.getLogger("tesela.lora")

NO_SLOT = -1  # the base model: no adapter


class StaleLoRAStateError(RuntimeError):
    """A forward pass ran with LoRA state planned for another batch (or none at all)."""


@dataclass
class LoRABuffers:
    """Per-batch LoRA state at fixed addresses, sized for the largest batch; graphs read it."""

    token_slot: torch.Tensor  # [max_tokens] int32: adapter slot of every token (-1: none)
    token_seg: torch.Tensor  # [max_tokens] int32: segment of every token
    seg_start: torch.Tensor  # [max_tokens + 2] int32: first token of every segment
    seg_slot: torch.Tensor  # [max_tokens + 1] int32: adapter slot of every segment
    ranks: torch.Tensor  # [max_loras] int32: rank of each slot's adapter (0: empty)
    scalings: torch.Tensor  # [max_loras] fp32

    @classmethod
    def allocate(cls, max_tokens: int, max_loras: int, device) -> LoRABuffers:
        def ints(n: int, value: int) -> torch.Tensor:
            return torch.full((n,), value, dtype=torch.int32, device=device)

        return cls(
            token_slot=ints(max_tokens, NO_SLOT),
            token_seg=ints(max_tokens, 0),
            seg_start=torch.tensor([0] + [max_tokens] * (max_tokens + 1), dtype=torch.int32).to(
                device
            ),
            seg_slot=ints(max_tokens + 1, NO_SLOT),
            ranks=ints(max_loras, 0),
            scalings=torch.zeros(max_loras, dtype=torch.float32, device=device),
        )

    @property
    def max_tokens(self) -> int:
        return int(self.token_slot.shape[0])

    def write(self, segments: list[tuple[int, int, int]], num_tokens: int) -> None:
        """Write a batch's segments (start, end, slot) covering its `num_tokens` tokens."""
        n, num_segs = num_tokens, len(segments)
        if n > self.max_tokens:
            raise AssertionError(f"{n} tokens exceed the LoRA buffers ({self.max_tokens})")
        token_slot, token_seg = [], []
        for index, (start, end, slot) in enumerate(segments):
            token_slot += [slot] * (end - start)
            token_seg += [index] * (end - start)
        # One trailing segment with no adapter covers any padding up to the largest size.
        starts = [s for s, _, _ in segments] + [n, self.max_tokens]
        slots = [s for _, _, s in segments] + [NO_SLOT]
        host = torch.tensor(token_slot + token_seg + starts + slots, dtype=torch.int32)
        host = host.pin_memory() if self.token_slot.is_cuda else host
        host = host.to(self.token_slot.device, non_blocking=True)
        parts = host.split([n, n, num_segs + 2, num_segs + 1])
        self.token_slot[:n].copy_(parts[0])
        self.token_slot[n:].fill_(NO_SLOT)
        self.token_seg[:n].copy_(parts[1])
        self.token_seg[n:].fill_(num_segs)
        self.seg_start[: num_segs + 2].copy_(parts[2])
        self.seg_slot[: num_segs + 1].copy_(parts[3])


@dataclass
class LoRABatchState:
    """The LoRA part of one batch's plan (host side; the device side is in LoRABuffers)."""

    stamp: BatchStamp
    style: str  # sgmv | gather: the kernel style the batch's graph runs
    segments: list[tuple[int, int, int]]  # (start, end, slot), covering the real tokens
    lora_ids: tuple[int, ...]  # per row
    manager: LoRAManager = field(repr=False)

    @property
    def has_adapters(self) -> bool:
        return any(slot != NO_SLOT for _, _, slot in self.segments)


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
    ) -> None:
        if max_loras <= 0 or max_lora_rank <= 0:
            raise ValueError("max_loras and max_lora_rank must be positive to enable LoRA")
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max(max_cpu_loras, max_loras)
        self.device, self.dtype, self.backend = device, dtype, backend
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

    def plan(self, batch: ForwardBatch) -> LoRABatchState:
        """Slots for the batch's adapters, then segments written into the device buffers."""
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
        style = GATHER if batch.mode.is_decode else SGMV
        return LoRABatchState(batch.stamp, style, segments, lora_ids, self)

    def state_for(self, batch: ForwardBatch, state: LoRABatchState | None) -> LoRABatchState:
        """The batch's LoRA state, checked: planned for this batch and still in the buffers."""
        if state is None:
            raise StaleLoRAStateError(
                f"LoRA layers ran {batch.stamp} with no LoRA state planned: plan the batch "
                "(LoRAManager.plan) before running the model"
            )
        if state.stamp != batch.stamp or self.buffer_stamp != batch.stamp:
            held = self.buffer_stamp if state.stamp == batch.stamp else state.stamp
            raise StaleLoRAStateError(
                f"LoRA layers ran {batch.stamp} with LoRA state planned for {held}: plan every "
                "batch (warmup, capture and replay included) before running it"
            )
        return state


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
