"""What the benchmarks in tesela/bench/ share: the model flags, host-visible timing (warmup, a
synchronize before every clock read, samples for a median), the device's name and copy
bandwidth, and writing results as JSON plus an optional matplotlib PNG (the `plot` extra)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that pick what is measured: model, dtype, device, attention backend."""
    parser.add_argument("--model", default="qwen3-0.6b", help="a model folder or a preset")
    parser.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--attention-backend", default="auto", help="auto | torch | triton")


def add_tensor_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="ranks (GPUs) to split the model over"
    )
    parser.add_argument(
        "--custom-all-reduce",
        action="store_true",
        help="small all-reduces over NVLink peer memory (default: NCCL for all)",
    )
    parser.add_argument(
        "--fused-all-reduce-add-norm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode batches' all-reduce + residual add + RMSNorm in one kernel (default: on)",
    )


def add_output_argument(parser: argparse.ArgumentParser, what: str = "JSON (and PNG)") -> None:
    parser.add_argument("--output-dir", default="results", help=f"where {what} go")


def int_list(text: str, flag: str) -> list[int]:
    """A comma-separated flag of positive integers (`--batch-sizes 1,8,32`)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} needs positive integers, got {text!r}")
    return values


def sync(device: torch.device) -> None:
    """Wait for the device, so a host clock read after it covers the work launched before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_samples_ms(
    fn: Callable[[Any], Any], make_input: Callable[[], Any], device, repeat: int, warmup: int
) -> tuple[list[float], Any]:
    """Host-visible ms (launch to synchronized result) of `fn(make_input())`, `repeat` times
    after `warmup` untimed calls; building the input is not timed. Returns the last output."""
    arg = make_input()
    for _ in range(warmup):
        out = fn(arg)
    sync(device)
    samples = []
    for _ in range(repeat):
        arg = make_input()
        start = time.perf_counter()
        out = fn(arg)
        sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples, out


def pipelined_ms(fn: Callable[[Any], Any], arg, device, steps: int = 20, rounds: int = 5) -> float:
    """The device's pace: median over `rounds` of the ms per call of `steps` back-to-back calls
    of `fn(arg)` with no wait between them, so the host enqueues a call while the device runs
    the last one (as the engine's overlap scheduler runs steps). A call that waits for the
    device itself, or whose host work outlasts its device work, is timed at the host's pace.
    CUDA events on a GPU, the host clock elsewhere."""
    for _ in range(3):
        fn(arg)
    sync(device)
    on_gpu = device.type == "cuda"
    samples = []
    for _ in range(rounds):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        begin = time.perf_counter()
        for _ in range(steps):
            fn(arg)
        if on_gpu:
            end.record()
            sync(device)
        ms = start.elapsed_time(end) if on_gpu else (time.perf_counter() - begin) * 1e3
        samples.append(ms / steps)
    return statistics.median(samples)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def weight_nbytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written: 1 GiB timed
    with CUDA events on a GPU, 64 MiB on the host clock on CPU."""
    if device.type != "cuda":
        src = torch.randint(0, 255, (2**26,), dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)
        start = time.perf_counter()
        for _ in range(5):
            dst.copy_(src)
        return 2 * src.numel() * 5 / (time.perf_counter() - start)
    src = torch.randint(0, 255, (2**30,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    sync(device)
    return 2 * src.numel() * 10 / (start.elapsed_time(end) / 1e3)


def write_json(results: dict, output_dir: Path, name: str) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def pyplot(json_path: Path):
    """matplotlib.pyplot on the Agg backend, or None (said on stderr) without the `plot` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            f"(no plot: pip install 'tesela[plot]' for PNGs; numbers in {json_path})",
            file=sys.stderr,
        )
        return None
    return plt


def save_figure(fig, output_dir: Path, name: str) -> None:
    fig.tight_layout()
    fig.savefig(output_dir / f"{name}.png", dpi=120)
