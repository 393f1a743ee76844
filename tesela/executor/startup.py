"""Startup as named phases: each checks what it needs, and is logged with its time and memory.

The order is load-bearing (docs/architecture.md, "Startup"): piecewise graphs are captured on a
provisional KV pool, because what the graphs take must be known before the real pool is sized
from what is left; FULL decode and FULL mixed graphs bake in the real pool's addresses, so they
come after it (FULL mixed graphs share the piecewise graphs' memory pool, whose memory was
reserved before sizing).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

logger = logging.getLogger("tesela.startup")

LOAD_WEIGHTS = "load_weights"
CAPTURE_PIECEWISE = "capture_piecewise"
SIZE_KV_POOL = "size_kv_pool"
CAPTURE_FULL_DECODE = "capture_full_decode"
CAPTURE_FULL_MIXED = "capture_full_mixed"
VERIFY = "verify"
PHASES = (
    LOAD_WEIGHTS,
    CAPTURE_PIECEWISE,
    SIZE_KV_POOL,
    CAPTURE_FULL_DECODE,
    CAPTURE_FULL_MIXED,
    VERIFY,
)


@dataclass(frozen=True)
class PhaseRecord:
    name: str
    seconds: float
    memory_bytes: int  # device memory in use after the phase (0 on CPU)
    skipped: str | None = None  # why the phase had nothing to do


class Startup:
    """Runs the phases in `PHASES` order; a phase whose predecessors have not completed is a
    bug in the caller and raises."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.records: list[PhaseRecord] = []

    @property
    def done(self) -> tuple[str, ...]:
        return tuple(record.name for record in self.records)

    def _memory(self) -> int:
        if self.device.type != "cuda":
            return 0
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def skip(self, name: str, reason: str) -> None:
        self._check_order(name)
        self.records.append(PhaseRecord(name, 0.0, self._memory(), skipped=reason))
        logger.info("startup %s: skipped (%s)", name, reason)

    def _check_order(self, name: str) -> None:
        expected = PHASES[len(self.records)] if len(self.records) < len(PHASES) else None
        if name != expected:
            raise RuntimeError(
                f"startup phase {name!r} ran after {self.done}; the order is {PHASES}"
            )

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._check_order(name)
        start = time.perf_counter()
        yield
        record = PhaseRecord(name, time.perf_counter() - start, self._memory())
        self.records.append(record)
        logger.info(
            "startup %s: %.2f s, device memory in use %.2f GiB",
            name,
            record.seconds,
            record.memory_bytes / 2**30,
        )
