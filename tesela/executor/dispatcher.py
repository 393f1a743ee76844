"""The dispatcher: one ordered table says which runner serves which batch, and counts why.

  FULL_DECODE  a decode batch whose row count has a FULL graph (attention inside)
  FULL_MIXED   any batch within the ladder and the rows a FULL mixed graph holds, for a
               backend that declares ALWAYS graph support (attention inside)
  PIECEWISE    an extend/mixed/decode batch within the piecewise capture ladder
  EAGER        anything else, and every batch when graphs are off

The table `routes` is the single source of truth: a batch runs on the first runner (in `ORDER`)
whose `can_run` accepts it. A batch that ends on EAGER is counted under the reason
the last graph runner gave, so a surprising path shows up in stats and logs.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

from tesela.core.forward_batch import ForwardBatch
from tesela.executor.graph_runner import CaptureReport, EagerRunner, GraphRunner

logger = logging.getLogger("tesela.dispatcher")


class RunPath(enum.Enum):
    FULL_DECODE = "full"
    FULL_MIXED = "full_mixed"
    PIECEWISE = "piecewise"
    EAGER = "eager"


# Most specialized first; eager always last and always accepts.
ORDER = (RunPath.FULL_DECODE, RunPath.FULL_MIXED, RunPath.PIECEWISE, RunPath.EAGER)


@dataclass
class DispatchStats:
    paths: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "paths": {p.value: self.paths[p] for p in RunPath},
            "fallbacks": dict(self.fallbacks),
        }


class Dispatcher:
    def __init__(self, eager: EagerRunner) -> None:
        self.runners: dict[RunPath, GraphRunner] = {RunPath.EAGER: eager}
        self.stats = DispatchStats()
        self._routes: tuple = ()
        self._rebuild()

    def add(self, path: RunPath, runner: GraphRunner) -> None:
        if path in self.runners:
            raise ValueError(f"{path.value} already has a runner")
        self.runners[path] = runner
        self._rebuild()

    def _rebuild(self) -> None:
        # (path, can_run, run) in ORDER: the hot loop calls bound methods, nothing else.
        self._routes = tuple(
            (path, self.runners[path].can_run, self.runners[path].run)
            for path in ORDER
            if path in self.runners
        )

    def release_graphs(self) -> None:
        """Drop every graph runner (eager only from here on): their CUDA graphs are freed once
        nothing else holds them. Shutdown does this before leaving the NCCL process group."""
        self.runners = {RunPath.EAGER: self.runners[RunPath.EAGER]}
        self._rebuild()

    def runner(self, path: RunPath) -> GraphRunner | None:
        return self.runners.get(path)

    def keys(self) -> dict[RunPath, tuple[int, ...]]:
        """Which sizes each graph path serves (tokens for piecewise, rows for FULL decode)."""
        return {
            path: tuple(runner.sizes)
            for path, runner in self.runners.items()
            if path is not RunPath.EAGER
        }

    def reports(self) -> list[CaptureReport]:
        reports = (self.runners[path].report() for path in ORDER if path in self.runners)
        return [report for report in reports if report is not None]

    def choose(self, batch: ForwardBatch) -> tuple[RunPath, str | None]:
        reason = "graphs_disabled"
        for path, can_run, _ in self._routes:
            refusal = can_run(batch)
            if refusal is None:
                return path, (reason if path is RunPath.EAGER else None)
            reason = refusal
        raise AssertionError("the eager runner accepts every batch")

    def route(self, batch: ForwardBatch) -> tuple[RunPath, GraphRunner]:
        """The runner that serves `batch` (counted in stats, with the fallback reason). A batch
        with fed token ids (overlap scheduling) leaves with them written in, unless its runner
        writes them itself (a FULL decode graph, in its first kernel)."""
        reason = "graphs_disabled"
        for path, can_run, _ in self._routes:
            refusal = can_run(batch)
            if refusal is None:
                self.stats.paths[path] += 1
                if path is RunPath.EAGER:
                    self.stats.fallbacks[reason] += 1
                    logger.debug("%s runs eagerly: %s", batch.stamp, reason)
                runner = self.runners[path]
                if not runner.resolves_feed:
                    batch.feed_tokens()
                return path, runner
            reason = refusal
        raise AssertionError("the eager runner accepts every batch")

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        return self.route(batch)[1].run(batch)
