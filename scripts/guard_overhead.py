#!/usr/bin/env python3
"""Host cost of dynamo's guards on the compiled piecewise strategy (CPU microbenchmark).

Builds the `tiny` model with compiled (eager) pieces on CPU, then times one forward of a
captured size two ways over the same pieces and stand-in graphs: through dynamo (guards + frame
evaluation, what every call paid before replay skipped it) and the direct call that replay now
makes (tesela/executor/piecewise/compiled.py, `_GraphCall`). The difference is what dynamo adds
per forward. Prints microseconds per call (median of the fastest half); run with `python3 scripts/guard_overhead.py`.
"""

from __future__ import annotations

import statistics
import time

import torch

from tesela.core.forward_context import forward_context
from tesela.engine.llm_engine import make_engine_config
from tesela.executor.model_runner import ModelRunner


def median_us(fn, repeat: int = 300) -> float:
    """Median of the fastest half: a shared CPU's stalls only ever add time."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(sorted(samples)[: repeat // 2])


def main() -> None:
    config, path = make_engine_config(
        "tiny", prefill_graph="compiled", capture_sizes=[16], num_kv_tokens=1024
    )
    runner = ModelRunner(config, path)
    piecewise = runner.piecewise
    pieces = piecewise.pieces
    batch = piecewise._capture_batch(16)
    plan = runner.planner.plan(batch)
    input_ids, positions = piecewise.buffers.slice(16)
    with torch.inference_mode(), forward_context(batch, plan, runner.attn_backend):
        direct = median_us(lambda: pieces(input_ids, positions))
        pieces.captured_sizes.clear()  # every call through dynamo, as before
        dynamo = median_us(lambda: pieces(input_ids, positions))
        pieces.captured_sizes.add(16)
    print(f"forward of 16 tokens, {len(pieces.pieces)} pieces (CPU stand-in graphs):")
    print(f"  through dynamo: {dynamo:.1f} us   direct replay: {direct:.1f} us")
    print(f"  dynamo adds {dynamo - direct:.1f} us per forward (once per forward, not per piece)")


if __name__ == "__main__":
    main()
