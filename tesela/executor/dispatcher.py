"""The dispatcher: one place decides how each batch runs, and counts why.

  FULL       a decode batch whose size has a full graph (attention inside)
  PIECEWISE  an extend/mixed/decode batch within the piecewise capture ladder
  EAGER      anything else, and every batch when graphs are off

Every fallback is counted by reason, so a surprising path shows up in stats and logs.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

from tesela.executor.forward_batch import ForwardBatch

logger = logging.getLogger("tesela.dispatcher")


class RunPath(enum.Enum):
    FULL = "full"
    PIECEWISE = "piecewise"
    EAGER = "eager"


@dataclass
class DispatchStats:
    paths: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "paths": {p.value: self.paths[p] for p in RunPath},
            "fallbacks": dict(self.fallbacks),
        }


@dataclass
class GraphRunners:
    model_runner: object
    piecewise: object | None = None  # PiecewiseRunner
    decode: object | None = None  # DecodeGraphRunner
    stats: DispatchStats = field(default_factory=DispatchStats)
    capture_reports: list = field(default_factory=list)

    @classmethod
    def build(cls, model_runner) -> GraphRunners:
        graph = model_runner.config.graph
        runners = cls(model_runner)
        if graph.piecewise_enabled:
            from tesela.executor.piecewise.runner import PiecewiseRunner

            runners.piecewise = PiecewiseRunner(model_runner, graph)
            runners.capture_reports.append(runners.piecewise.capture())
        return runners

    def capture_decode(self) -> None:
        """FULL decode graphs bake in the KV pool's addresses: capture them once the real pool
        exists."""
        runner = self.model_runner
        graph = runner.config.graph
        if not (graph.full_cudagraph and graph.decode_batch_sizes) or runner.device.type != "cuda":
            return
        from tesela.executor.decode_graph import DecodeGraphRunner

        self.decode = DecodeGraphRunner(
            runner, graph.decode_batch_sizes, runner.config.scheduler.max_model_len
        )
        self.capture_reports.append(self.decode.capture())

    def choose(self, batch: ForwardBatch) -> tuple[RunPath, str | None]:
        if self.decode is not None and batch.mode.is_decode:
            reason = self.decode.can_run(batch)
            if reason is None:
                return RunPath.FULL, None
        if self.piecewise is None:
            return RunPath.EAGER, "graphs_disabled"
        reason = self.piecewise.can_run(batch)
        if reason is None:
            return RunPath.PIECEWISE, None
        return RunPath.EAGER, reason

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        path, reason = self.choose(batch)
        self.stats.paths[path] += 1
        if reason is not None:
            self.stats.fallbacks[reason] += 1
            logger.debug("%s runs eagerly: %s", batch.stamp, reason)
        if path is RunPath.FULL:
            return self.decode.run(batch)
        if path is RunPath.PIECEWISE:
            return self.piecewise.run(batch)
        return self.model_runner.forward_eager(batch)
