#!/usr/bin/env python3
"""Where a decode step's time goes, kernel by kernel (run it on a GPU machine).

    python3 scripts/profile_decode_step.py --model qwen3-0.6b --batch-size 1 --context 256

Profiles `--steps` FULL decode replays (the eager forward where none was captured) plus the LM
head and argmax over prebuilt rows of `--context` cached tokens (random K/V, as `tesela bench
decode` fills them), and prints, per kernel name, its calls a step and its *advance*: the time
from the end of the kernel before it to its own end. Under programmatic dependent launch a
kernel starts early and its own duration counts its wait, so the advance is what it adds to the
step. The LM head and argmax here are the eager ones (`compute_logits`, `torch.argmax`), not
the engine's sampling graphs. docs/bench-results.md has its tables (sixth session of
2026-11-29).
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from tesela.bench.decode import decode_batch
from tesela.engine.llm_engine import make_engine_config
from tesela.executor.model_runner import ModelRunner


def advance_by_kernel(spans: list[tuple[str, float, float]]):
    """Per kernel name: (calls, advance, own time) over `spans` of (name, start, end). In
    start order, a kernel's advance is from the latest end before it to its own end (zero when
    it ends earlier: it overlapped a longer one); its own time is end - start, which under PDL
    includes its wait for the kernel before it."""
    calls, advance, own = collections.Counter(), collections.Counter(), collections.Counter()
    last_end = None
    for name, start, end in sorted(spans, key=lambda span: span[1]):
        if last_end is not None:
            advance[name] += max(end - last_end, 0)
        last_end = end if last_end is None else max(last_end, end)
        calls[name] += 1
        own[name] += end - start
    return calls, advance, own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    on_cuda = args.device.startswith("cuda")
    b, c = args.batch_size, args.context
    config, path = make_engine_config(
        args.model, dtype="bfloat16" if on_cuda else "float32", device=args.device,
        num_kv_tokens=b * (c + 16) + 64, max_num_seqs=b, max_model_len=c + 16,
        capture_sizes=[b], full_mixed=False, piecewise_cudagraph="none",
    )  # fmt: skip
    runner = ModelRunner(config, path)
    for pool in (*runner.kv_cache.k_buffers, *runner.kv_cache.v_buffers):
        pool.normal_()
    batch = decode_batch(runner, b, c)
    forward = runner.full_decode.run if runner.full_decode is not None else runner.forward_eager

    @torch.inference_mode()
    def step() -> torch.Tensor:
        hidden = forward(batch)
        return runner.compute_logits(hidden[batch.logits_indices]).argmax(dim=-1)

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize()

    for _ in range(args.steps):
        step()
    sync()
    activity = ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(args.steps):
            step()
        sync()
    kind = "CUDA" if on_cuda else "CPU"
    events = [
        e for e in prof.events()
        if e.device_type.name == kind and not e.name.startswith(("Memcpy", "Memset"))
        and (on_cuda or e.cpu_parent is None)  # on CPU: the top-level ops only
    ]  # fmt: skip
    spans = [(e.name.split("(")[0][:60], e.time_range.start, e.time_range.end) for e in events]
    calls, advance, own = advance_by_kernel(spans)
    steps = args.steps
    span = (max(end for _, _, end in spans) - min(start for _, start, _ in spans)) / steps
    layers = config.model_config.num_hidden_layers
    print(
        f"{args.model}, batch {b}, context {c} on {runner.device}: {span:.1f} us a step "
        f"(profiled), {len(events) / steps:.1f} kernels a step, {layers} layers"
    )
    print("| kernel | calls a step | advance us a step | advance us a call | own us a call |")
    print("|---|---|---|---|---|")
    for name, total in advance.most_common():
        n = calls[name]
        print(
            f"| {name} | {n / steps:.0f} | {total / steps:.1f} | {total / n:.2f} | "
            f"{own[name] / n:.2f} |"
        )


if __name__ == "__main__":
    main()
