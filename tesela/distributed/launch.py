"""Run one function on every rank of a single-host tensor-parallel group (SPMD).

The benchmarks drive ModelRunners directly, batch by batch; at tensor-parallel size N each
rank must run the very same batches, which is simplest when every rank runs the same script:
`run_spmd(fn, N, device, *args)` spawns N processes with the rendezvous variables torchrun
would set, calls `fn(tp, *args)` in each and returns rank 0's result. Size 1 calls `fn`
in-process with the single-rank group. Also here: `all_reduce_latency_us`, the cost of one
all-reduce of a given shape, as the model's layers issue it (inside a CUDA graph on CUDA).
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from tesela.distributed.group import (
    SINGLE,
    TPGroup,
    destroy_distributed,
    free_port,
    init_distributed,
    rendezvous_env,
)


def _rank_entry(
    fn, rank: int, size: int, port: int, device: str, args: tuple, queue, options: dict
) -> None:
    tp = init_distributed(
        device=device, env=rendezvous_env(rank, size, port), timeout_s=600, **options
    )
    try:
        result = fn(tp, *args)
        if rank == 0:
            queue.put(("ok", result))
    except BaseException:
        queue.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
        raise
    finally:
        # `fn`'s runner is gone now; collect its CUDA graphs before NCCL's teardown, which
        # blocks while graphs that captured its collectives are alive.
        gc.collect()
        destroy_distributed(barrier=False)


def run_spmd(
    fn: Callable[..., Any],
    size: int,
    device: str,
    *args,
    custom_all_reduce: bool = False,
    fused_all_reduce_add_norm: bool = True,
) -> Any:
    """fn(tp, *args) on `size` ranks; rank 0's return value (or the first rank's error).
    `custom_all_reduce` and `fused_all_reduce_add_norm` are init_distributed's options."""
    options = dict(
        custom_all_reduce=custom_all_reduce, fused_all_reduce_add_norm=fused_all_reduce_add_norm
    )
    if size == 1:
        return fn(SINGLE, *args)
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_rank_entry,
            args=(fn, rank, size, port, device, args, queue, options),
        )
        for rank in range(size)
    ]
    for process in processes:
        process.start()
    status, payload = queue.get()
    for process in processes:
        process.join(timeout=60 if status == "ok" else 5)
        if process.is_alive():
            process.kill()
    if status != "ok":
        raise RuntimeError(f"a tensor-parallel rank failed: {payload}")
    return payload


def all_reduce_latency_us(
    tp: TPGroup, shape: tuple[int, ...], dtype: torch.dtype, device, repeat: int = 20
) -> float:
    """Median microseconds of one in-place all-reduce of `shape` (0 for a single rank)."""
    x = torch.zeros(shape, dtype=dtype, device=device)
    return collective_latency_us(tp, lambda: tp.all_reduce_(x), device, repeat)


def collective_latency_us(tp: TPGroup, call: Callable[[], Any], device, repeat: int = 20) -> float:
    """Median microseconds of one `call()` of a collective, on every rank at once (0 for a
    single rank). On CUDA the calls are captured in graphs, as the decode and piecewise graphs
    run them. The figure is the difference between a long and a short chain of calls, per
    extra call: what the chains share cancels out, the graph launch and the skew between the
    ranks' starts (the first call of a chain waits for the last rank to arrive)."""
    if tp.size == 1:
        return 0.0
    device = torch.device(device)
    short, long = 4, 36
    if device.type != "cuda":  # gloo ranks, kernels in the interpreter: a smoke figure, kept cheap
        short, long, repeat = 1, 4, min(repeat, 3)

    def chain(length: int) -> None:
        for _ in range(length):
            call()

    graphs = {}
    if device.type == "cuda":
        chain(3)  # creates the NCCL communicator outside the capture
        for length in (short, long):
            graphs[length] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[length]):
                chain(length)

    def seconds(length: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        if graphs:
            graphs[length].replay()
        else:
            chain(length)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    differences = [(seconds(long) - seconds(short)) / (long - short) * 1e6 for _ in range(repeat)]
    for graph in graphs.values():
        graph.reset()  # they hold collectives: gone before the group is left
    return max(statistics.median(differences), 0.0)
