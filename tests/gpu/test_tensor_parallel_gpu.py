"""Tensor parallelism on two CUDA cards: NCCL collectives inside every graph mode.

Run on a machine with >= 2 GPUs (skipped otherwise):
    pytest -q -m gpu tests/gpu/test_tensor_parallel_gpu.py

- fp32 greedy at TP=2 equals TP=1, with graphs off, with breakable piecewise + FULL decode
  graphs, with compiled piecewise graphs and with FULL mixed graphs (the dispatch counters
  prove the graph paths ran), and every such engine shuts down (its graphs freed first);
  decode batches take the fused all-reduce + add + RMSNorm (each TP engine runs in a fresh
  process, where it can set up peer memory, and its stats prove the kernel ran);
- the custom (symmetric-memory) all-reduce equals NCCL, eagerly and inside a CUDA graph, and
  so does the fused all-reduce + add + RMSNorm of decode batches;
- bf16 at TP=2 against transformers on the same checkpoint (tolerances of
  tests/gpu/test_reference_gpu.py);
- a second TP engine in one process keeps NCCL, says why, and gives the same tokens;
- killing a worker mid-generation (graphs on, fused kernel) fails the engine within 30 s.
"""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from test_reference_gpu import assert_matches_transformers

from tesela import LLM, SamplingParams

pytestmark = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="tensor parallelism needs 2 CUDA devices"
)

PROMPTS = [[5, 17, 42, 8, 99, 3], [7, 7, 7, 250, 13], [300, 301, 12, 77, 54, 23, 9, 81, 44, 6, 1]]
GRAPH_MODES = {
    "off": dict(disable_cudagraph=True),
    # FULL mixed off: prefills take the piecewise graphs, whose splits sit between collectives
    "breakable": dict(
        piecewise_cudagraph="breakable", capture_sizes=[4, 8, 16, 32], full_mixed=False
    ),
    "compiled": dict(
        piecewise_cudagraph="compiled", capture_sizes=[4, 8, 16, 32], full_mixed=False
    ),
    "full_mixed": dict(capture_sizes=[4, 8, 16, 32]),
}
# The graph path each mode's prefills must take (decode steps take FULL decode graphs).
PREFILL_PATH = {"breakable": "piecewise", "compiled": "piecewise", "full_mixed": "full_mixed"}


def generate_here(path, tp: int, **kwargs):
    """Greedy outputs of PROMPTS and the engine's stats, in this process."""
    llm = LLM(str(path), tensor_parallel_size=tp, num_kv_tokens=4096, **kwargs)
    try:
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
        return llm.generate(PROMPTS, params), llm.engine.stats()
    finally:
        llm.shutdown()


def _in_child(results, runs: list) -> None:
    try:
        results.put([generate_here(*args, **kwargs) for args, kwargs in runs])
    except BaseException as exc:
        results.put(repr(exc))


def in_fresh_process(*runs: tuple[tuple, dict]) -> list:
    """generate_here(*args, **kwargs) of each run, one after another, in a fresh process: rank 0
    lives in the engine's process, and torch lets a process set up peer memory for one TP
    engine only (an engine after it keeps NCCL, see
    test_a_second_engine_in_one_process_keeps_nccl_and_says_why), so each engine that should
    run the fused all-reduce kernel gets a process of its own."""
    import multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_in_child, args=(results, list(runs)))
    process.start()
    try:
        got = results.get(timeout=300)
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    assert isinstance(got, list), got
    return got


def generate(path, tp: int, **kwargs):
    """(outputs, stats) of one engine; a TP engine in a fresh process, fused all-reduce on."""
    if tp == 1:
        return generate_here(path, 1, **kwargs)
    ((outputs, stats),) = in_fresh_process(((str(path), tp), kwargs))
    assert stats["tensor_parallel"]["fused_all_reduce_add_norm_launches"] > 0, stats
    return outputs, stats


@pytest.mark.parametrize("mode", list(GRAPH_MODES))
def test_tp2_greedy_equals_tp1(checkpoints, mode):
    """Decode batches through the fused all-reduce + add + norm (generate asserts it ran)."""
    path, _ = checkpoints["llama"]
    kwargs = dict(dtype="float32", attention_backend="triton", **GRAPH_MODES[mode])
    expected, _ = generate(path, 1, **kwargs)
    got, stats = generate(path, 2, **kwargs)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    for a, b in zip(got, expected, strict=True):
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(x.logprob - y.logprob) < 1e-3
    paths = stats["dispatch"]["paths"]
    if mode != "off":
        assert paths[PREFILL_PATH[mode]] > 0 and paths["full"] > 0, paths


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_tp2_bf16_matches_transformers(checkpoints, arch):
    path, hf_model = checkpoints[arch]
    hf = copy.deepcopy(hf_model).to(device="cuda", dtype=torch.bfloat16)
    outputs, _ = generate(path, 2, dtype="bfloat16", capture_sizes=[4, 8, 16])
    assert_matches_transformers(hf, PROMPTS, outputs)


def test_a_second_engine_in_one_process_keeps_nccl_and_says_why(checkpoints):
    """torch numbers a process's symmetric-memory rendezvous for the life of the process, and
    rank 0 lives in the engine's process: the first engine there fuses decode batches'
    all-reduce + add + norm over peer memory, the next one (fresh workers) would never meet
    its rank 0 there, so it keeps NCCL and says why; both give the same tokens."""
    path, _ = checkpoints["llama"]
    kwargs = dict(dtype="bfloat16", attention_backend="triton", capture_sizes=[4, 8, 16])
    (first, first_stats), (second, second_stats) = in_fresh_process(
        ((str(path), 2), kwargs), ((str(path), 2), kwargs)
    )
    first_tp, second_tp = first_stats["tensor_parallel"], second_stats["tensor_parallel"]
    assert first_tp["all_reduce_add_norm"].startswith("fused"), first_tp
    assert first_tp["fused_all_reduce_add_norm_launches"] > 0, first_tp
    assert second_tp["all_reduce_add_norm"].startswith("unfused (an earlier engine"), second_tp
    assert second_tp["fused_all_reduce_add_norm_launches"] == 0, second_tp
    assert [o.token_ids for o in second] == [o.token_ids for o in first]


def _kill_a_worker_mid_generation(results) -> None:
    """In a fresh process (so the engine reduces decode batches in the fused kernel): start
    generating, kill rank 1, keep stepping; sends back what the stepping ended with, how long
    after the kill, and the fused kernel's launches before it."""
    from tesela.executor.multiproc import WorkerFailedError

    llm = LLM("qwen3-0.6b", tensor_parallel_size=2, num_kv_tokens=8192, capture_sizes=[8, 16])
    engine = llm.engine
    engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=4000, ignore_eos=True))
    for _ in range(5):
        engine.step()
    launches = engine.stats()["tensor_parallel"]["fused_all_reduce_add_norm_launches"]
    outcome: list[BaseException] = []

    def keep_stepping() -> None:
        try:
            while True:
                engine.step()
        except BaseException as error:  # noqa: BLE001  (the outcome is the assertion below)
            outcome.append(error)

    stepper = threading.Thread(target=keep_stepping, daemon=True)
    stepper.start()
    start = time.monotonic()
    engine.runner.workers[0].process.kill()
    stepper.join(timeout=40)
    took = time.monotonic() - start
    error = outcome[0] if outcome else None
    results.put((isinstance(error, WorkerFailedError), str(error), took, launches))
    if error is not None:
        llm.shutdown()


def test_killing_a_worker_ends_the_engine_within_30_s():
    """Graphs on: rank 0 would spin in the fused all-reduce kernel (or an NCCL collective
    inside a graph replay) waiting for the dead peer; the watchdog must see the exit, raise
    the kernel's abort flag, abort the communicators and fail the engine."""
    import multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_kill_a_worker_mid_generation, args=(results,))
    process.start()
    try:
        failed, message, took, launches = results.get(timeout=240)
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    assert launches > 0  # decode batches did run the fused kernel
    assert failed, f"the engine did not fail with WorkerFailedError: {message}"
    assert "rank 1" in message and took < 30, (message, took)


def _reduce_both_ways(tp, shapes):
    """On each rank: every shape reduced by the custom all-reduce (eager and replayed from a
    CUDA graph) and by NCCL, on the same per-rank random data; True where they agree."""
    import torch.distributed as dist

    results = {"kind": tp.all_reduce.kind}
    for shape, dtype in shapes:
        generator = torch.Generator(device="cuda").manual_seed(tp.rank)
        data = torch.randn(shape, device="cuda", dtype=dtype, generator=generator)
        nccl = data.clone()
        dist.all_reduce(nccl, group=tp.process_group)
        eager = tp.all_reduce_(data.clone())
        static = torch.zeros_like(data)
        tp.all_reduce_(static)  # warm the path outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            tp.all_reduce_(static)
        static.copy_(data)
        graph.replay()
        torch.cuda.synchronize()
        graph.reset()
        results[(shape, str(dtype))] = (torch.equal(eager, nccl), torch.equal(static, nccl))
    return results


def test_custom_all_reduce_equals_nccl():
    """One-shot, two-shot and the NCCL fallback (a large message; fp16, which the one-shot
    kernel lacks), bf16 and fp32, eager and in a graph:
    two ranks' sums are exact either way, so the custom all-reduce must equal NCCL bitwise."""
    from tesela.distributed.custom_all_reduce import algorithm_for
    from tesela.distributed.launch import run_spmd

    shapes = [((1, 4096), torch.bfloat16), ((7, 1000), torch.float32), ((100, 4096), torch.bfloat16),
              ((600, 4096), torch.bfloat16), ((3, 5, 64), torch.float16)]  # fmt: skip
    used = {algorithm_for(torch.empty(s, dtype=d, device="meta")) for s, d in shapes}
    assert used == {"one_shot", "two_shot", "nccl"}
    results = run_spmd(_reduce_both_ways, 2, "cuda", shapes, custom_all_reduce=True)
    assert results.pop("kind") == "symm_mem"
    assert all(all(agree) for agree in results.values()), results


def _add_norm_both_ways(tp, shapes):
    """On each rank: every shape through the fused all-reduce + add + RMSNorm (eager, and
    replayed three times from a CUDA graph) and through NCCL then the add + norm kernel, on
    the same per-rank partial sums (the residual and weight are equal on every rank, as in
    the model); True where they agree bitwise."""
    import torch.distributed as dist

    from tesela.distributed.group import all_reduce_add_norm_kernel
    from tesela.layers.norm import add_rms_norm, all_reduce_add_rms_norm

    results = {"kind": tp.all_reduce_add_norm.kind}
    kernel = all_reduce_add_norm_kernel(tp.name)
    for shape, dtype in shapes:
        launches = kernel.launches
        generator = torch.Generator(device="cuda").manual_seed(tp.rank)
        partial = torch.randn(shape, device="cuda", dtype=dtype, generator=generator)
        shared = torch.Generator(device="cuda").manual_seed(99)
        residual = torch.randn(shape, device="cuda", dtype=dtype, generator=shared)
        weight = torch.rand(shape[-1], device="cuda", dtype=dtype, generator=shared) + 0.5
        summed = partial.clone()
        dist.all_reduce(summed, group=tp.process_group)
        want = add_rms_norm(summed, residual, weight, 1e-6)
        eager = all_reduce_add_rms_norm(partial.clone(), residual, weight, 1e-6, tp)
        static = partial.clone()
        all_reduce_add_rms_norm(static.clone(), residual, weight, 1e-6, tp)  # warm up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = all_reduce_add_rms_norm(static, residual, weight, 1e-6, tp)
        agree = [all(torch.equal(a, b) for a, b in zip(eager, want, strict=True))]
        for _ in range(3):
            static.copy_(partial)
            graph.replay()
            torch.cuda.synchronize()
            agree.append(all(torch.equal(a, b) for a, b in zip(replayed, want, strict=True)))
        graph.reset()
        results[(shape, str(dtype))] = agree
        results[("fused", shape)] = kernel.launches - launches  # eager, warm-up, capture
    return results


def test_fused_all_reduce_add_norm_equals_nccl_then_norm():
    """Decode-sized rows of the first call's width and dtype take the fused kernel (1 and 16
    rows); another width and dtype, and 17 rows, fall back to NCCL; every result equals NCCL
    followed by the add + norm kernel bitwise (two ranks' sums are exact either way). Each
    replay reuses the graph's slots: three replays cover both."""
    from tesela.distributed.fused_all_reduce import MAX_ROWS
    from tesela.distributed.launch import run_spmd

    shapes = [((1, 4096), torch.bfloat16), ((MAX_ROWS, 4096), torch.bfloat16),
              ((3, 1000), torch.float32), ((MAX_ROWS + 1, 4096), torch.bfloat16)]  # fmt: skip
    results = run_spmd(_add_norm_both_ways, 2, "cuda", shapes)
    assert results.pop("kind") == "fused"
    fused = {shape: results.pop(("fused", shape)) for shape, _ in shapes}
    assert fused == {(1, 4096): 3, (MAX_ROWS, 4096): 3, (3, 1000): 0, (MAX_ROWS + 1, 4096): 0}
    assert all(all(agree) for agree in results.values()), results
