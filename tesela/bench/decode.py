"""`tesela bench decode`: one decode step by batch size and context, through the logits and
greedy sampling, eager vs graphs vs the HBM floor. JSON + table.

The floor counts exactly the bytes the timed step reads (`decode_floor_bytes`): every weight
once (the LM head included, since the step runs through the logits), the embedding rows the
batch gathers, and the K/V of every cached token; for a mixture-of-experts model, of the
experts only those the step routes to (`moe_step_weight_bytes`). Achieved GB/s is those bytes
over the step's time; launches per layer are the kernels one decoder layer launches (CUDA only).
Two step columns: "full graph" replays the forward graph and runs the LM head and argmax after
it; "graph+greedy" is the step the engine runs, the FULL decode graph with the LM head and
sampling captured (tokens back on the host), and "greedy/floor" is its ratio to the floor.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import torch

from tesela.bench.common import (
    add_model_arguments,
    add_output_argument,
    add_tensor_parallel_arguments,
    copy_bandwidth,
    device_name,
    host_samples_ms,
    int_list,
    sync,
    weight_nbytes,
    write_json,
)
from tesela.bench.prefill import (
    fitting_counts,
    format_tensor_parallel,
    run_on_ranks,
    tensor_parallel_results,
)
from tesela.core.forward_batch import ForwardBatch, ForwardMode
from tesela.distributed.sharding import Section
from tesela.engine.llm_engine import make_engine_config
from tesela.executor.model_runner import ModelRunner
from tesela.models.step_bytes import decode_step_weight_bytes, record_routed_experts


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--batch-sizes", default="1,8,32,128", help="decode batch sizes")
    parser.add_argument("--contexts", default="512,4096", help="tokens cached per row")
    parser.add_argument("--repeat", type=int, default=50, help="timed steps per cell")
    parser.add_argument(
        "--kv-budget-gib",
        type=float,
        default=None,
        help="skip shapes whose KV cache would exceed this (default: 40, or less when the "
        "weights leave less of the GPU: see kv_budget_gib)",
    )
    add_output_argument(parser, "the JSON")
    add_tensor_parallel_arguments(parser)


def run_decode(args: argparse.Namespace) -> int:
    """Every tensor-parallel rank runs the same batches (tesela/distributed/launch.py)."""
    return run_on_ranks(_run_decode, args)


def _run_decode(tp, args: argparse.Namespace) -> int:
    batch_sizes = int_list(args.batch_sizes, "--batch-sizes")
    probe, _ = make_engine_config(args.model, dtype=args.dtype, device=args.device)
    # A context needs its tokens plus a margin of positions (max_model_len = context + 16).
    contexts, notes = fitting_counts(
        int_list(args.contexts, "--contexts"),
        probe.model_config.max_position_embeddings - 16,
        "context",
    )
    # This rank's share of the KV cache (KV heads split, or replicated past their count).
    kv_heads = probe.model_config.num_key_value_heads
    local_kv_heads = Section(kv_heads).rank_units(tp.rank, tp.size)[1]
    per_token = kv_bytes_per_token(probe) * local_kv_heads // kv_heads
    budget_gib = args.kv_budget_gib or kv_budget_gib(probe)
    fits = [
        (b, c) for b in batch_sizes for c in contexts if b * c * per_token <= budget_gib * 2**30
    ]
    config, path = make_engine_config(
        args.model,
        dtype=args.dtype,
        device=args.device,
        attention_backend=args.attention_backend,
        num_kv_tokens=max(b * c for b, c in fits) + 64,
        max_num_seqs=max(batch_sizes),
        max_model_len=max(contexts) + 16,
        capture_sizes=batch_sizes,
        tensor_parallel_size=tp.size,
    )
    runner = ModelRunner(config, path, tp)
    for k, v in zip(runner.kv_cache.k_buffers, runner.kv_cache.v_buffers, strict=True):
        k.normal_()
        v.normal_()
    bandwidth = copy_bandwidth(runner.device)
    results = {
        "model": args.model,
        "device": device_name(runner.device),
        "dtype": config.dtype,
        "attention_backend": config.attention_backend,
        "copy_bandwidth_gbs": bandwidth / 1e9,
        "launches_per_layer": launches_per_layer(runner),
        "notes": notes,
        "rows": [],
        "skipped": [(b, c) for b in batch_sizes for c in contexts if (b, c) not in fits],
    }
    for b, c in fits:
        results["rows"].append(measure_row(runner, b, c, per_token, bandwidth, args.repeat))
    reports = [r for r in (runner.full_decode, runner.piecewise) if r is not None]
    graph_gib = {r.name: r.report().graph_memory_gib for r in reports}
    results.update(tensor_parallel_results(tp, runner, batch_sizes, graph_gib))
    if tp.rank == 0:
        write_outputs_decode(results, Path(args.output_dir))
        print(format_decode_table(results))
    return 0


def measure_row(runner, b: int, c: int, per_token: int, bandwidth: float, repeat: int) -> dict:
    batch = decode_batch(runner, b, c)
    floor_bytes = decode_floor_bytes(runner.model, b, c, per_token)
    if runner.config.model_config.moe is not None:  # only the experts the step routes to
        floor_bytes = moe_step_weight_bytes(runner, batch) + b * c * per_token
    row = {"batch": b, "context": c, "floor_bytes": floor_bytes}
    row["floor_ms"] = floor_bytes / bandwidth * 1e3
    row["eager_ms"], eager_logits = time_step(runner, runner.forward_eager, batch, repeat)
    row["launches_per_step"] = count_launches(
        runner, lambda: decode_step(runner.forward_eager, runner, batch)
    )
    full, piecewise = runner.full_decode, runner.piecewise
    if full is not None and full.can_run(batch) is None:
        row["full_graph_ms"], logits = time_step(runner, full.run, batch, repeat)
        row["full_max_abs_err"] = (logits - eager_logits).abs().max().item()
        row["full_gbs"] = floor_bytes / row["full_graph_ms"] / 1e6
        if full.samples_in_graph:
            row.update(time_graph_sampling(runner, full, batch, repeat))
    if piecewise is not None and piecewise.can_run(batch) is None:
        row["piecewise_ms"], _ = time_step(runner, piecewise.run, batch, repeat)
    return row


def time_graph_sampling(runner, full, batch: ForwardBatch, repeat: int) -> dict:
    """The FULL graph step with the LM head and sampling captured too (what the engine runs),
    tokens back on the host: greedy, and seeded top-k 50 at temperature 0.8."""
    from tesela.engine.sampling_params import SamplingParams
    from tesela.executor.sampling import SamplingTensors, variant_for

    vocab, n = runner.config.model_config.vocab_size, batch.batch_size
    result = {}
    for name, params in (
        ("full_sample_greedy_ms", SamplingParams(temperature=0.0)),
        ("full_sample_topk_ms", SamplingParams(temperature=0.8, top_k=50, seed=1)),
    ):
        tensors = SamplingTensors.build([params] * n, [1] * n, [0] * n, vocab, runner.device)
        variant = variant_for([params])

        def step(tensors=tensors, variant=variant):
            return full.run_sample(batch, tensors, variant).tokens.tolist()

        for _ in range(5):
            step()
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            step()
            samples.append((time.perf_counter() - start) * 1e3)
        result[name] = statistics.median(samples)
    return result


def kv_budget_gib(config) -> float:
    """40 GiB, or 60% of what the weights leave of the GPU (a 30B MoE on an 80 GB card)."""
    if torch.device(config.device).type != "cuda":
        return 40.0
    itemsize = torch.empty((), dtype=getattr(torch, config.dtype)).element_size()
    weights = config.model_config.num_parameters() * itemsize
    total = torch.cuda.mem_get_info()[1]
    return min(40.0, max(total - weights, 0) * 0.6 / 2**30)


def moe_step_weight_bytes(runner, batch: ForwardBatch) -> int:
    """The weights this decode step reads: attention, routers, the experts its tokens are
    routed to (counted in an eager run of the batch), embedding rows and the LM head."""
    with record_routed_experts(runner.model) as routed:
        runner.forward_eager(batch)
    return decode_step_weight_bytes(
        runner.config.model_config, batch.batch_size, runner.dtype.itemsize, routed
    )


def decode_floor_bytes(model, batch_size: int, context: int, kv_bytes_per_token: int) -> int:
    """Bytes one decode step reads at least: every weight once (the LM head too), the embedding
    rows the batch gathers (an untied table is not streamed; a tied one is, as the LM head),
    and the K/V of `context` tokens per row."""
    embedding = model.model.embed_tokens.weight
    row_bytes = embedding.shape[1] * embedding.element_size()
    weights = weight_nbytes(model)  # parameters() lists a tied table once
    if model.lm_head.weight is not embedding:
        weights -= embedding.numel() * embedding.element_size()
    gathered = min(batch_size, embedding.shape[0]) * row_bytes
    return weights + gathered + batch_size * context * kv_bytes_per_token


def kv_bytes_per_token(config) -> int:
    mc = config.model_config
    itemsize = torch.empty((), dtype=getattr(torch, config.dtype)).element_size()
    return 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * itemsize


def decode_batch(runner, batch_size: int, context: int) -> ForwardBatch:
    """`batch_size` rows, each with `context - 1` tokens cached in its own blocks."""
    block_size = runner.kv_cache.block_size
    blocks_per_row = -(-context // block_size)
    tables = [
        list(range(1 + r * blocks_per_row, 1 + (r + 1) * blocks_per_row)) for r in range(batch_size)
    ]
    generator = torch.Generator().manual_seed(batch_size * 7919 + context)
    vocab = runner.config.model_config.vocab_size
    tokens = torch.randint(0, vocab, (batch_size, 1), generator=generator).tolist()
    return ForwardBatch.build(
        token_ids=tokens,
        prefix_lens=[context - 1] * batch_size,
        block_tables=tables,
        block_size=block_size,
        device=runner.device,
        mode=ForwardMode.DECODE,
    )


@torch.inference_mode()
def decode_step(fn, runner, batch: ForwardBatch) -> tuple[torch.Tensor, list[int]]:
    """What the engine does per decode step: forward, logits, greedy tokens back on the host."""
    logits = runner.compute_logits(fn(batch)[batch.logits_indices])
    return logits, logits.argmax(dim=-1).tolist()


@torch.inference_mode()
def device_step(fn, runner, batch: ForwardBatch) -> torch.Tensor:
    """`decode_step` without reading the tokens back: what a step costs the device when the
    host does not wait for it (overlap scheduling reads a step's tokens one step later)."""
    return runner.compute_logits(fn(batch)[batch.logits_indices]).argmax(dim=-1)


def time_step(runner, fn, batch: ForwardBatch, repeat: int) -> tuple[float, torch.Tensor]:
    """Host-visible median ms of a decode step through sampling; and its logits."""
    step = functools.partial(decode_step, fn, runner)
    samples, (logits, _) = host_samples_ms(step, lambda: batch, runner.device, repeat, warmup=5)
    return statistics.median(samples), logits.clone()


def count_launches(runner, fn) -> int | None:
    """GPU kernels `fn` launches (torch.profiler's device events); None on CPU."""
    if runner.device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()  # compile and autotune outside the profile
    sync(runner.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(runner.device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len([e for e in kernels if not e.name.startswith(("Memcpy", "Memset"))])


@torch.inference_mode()
def launches_per_layer(runner) -> int | None:
    """Kernels one decoder layer launches in a batch-1 decode step (a middle layer, with the
    residual stream, as in the graph)."""
    from tesela.core.forward_context import forward_context

    model = runner.model.model
    batch = decode_batch(runner, 1, 16)
    layer = model.layers[min(1, len(model.layers) - 1)]
    hidden = model.embed_tokens(batch.input_ids)
    residual = hidden.clone()
    plan = runner.planner.plan(batch)

    def run_layer():
        with forward_context(batch, plan, runner.attn_backend):
            layer(batch.positions, hidden, residual)

    return count_launches(runner, run_layer)


def write_outputs_decode(results: dict, output_dir: Path) -> None:
    flat = {
        "model": results["model"],
        "device": results["device"],
        "num_tokens": [],
        "latency_ms": {},
        **results,
    }
    for row in results["rows"]:
        key = f"b{row['batch']}-c{row['context']}"
        for column in (
            "eager",
            "full_graph",
            "piecewise",
            "floor",
            "full_sample_greedy",
            "full_sample_topk",
        ):
            if f"{column}_ms" in row:
                flat["latency_ms"][f"{column}/{key}"] = row[f"{column}_ms"]
    size = results["tensor_parallel_size"]
    suffix = f"-tp{size}" if size > 1 else ""
    write_json(flat, output_dir, f"decode-{results['model']}{suffix}")


def format_decode_table(results: dict) -> str:
    launches = results["launches_per_layer"]
    lines = [
        f"decode step through logits + greedy sampling, {results['model']} ({results['dtype']}, "
        f"attention {results['attention_backend']}) on {results['device']}, copy "
        f"{results['copy_bandwidth_gbs']:.0f} GB/s, launches per layer "
        f"{'n/a' if launches is None else launches}: median ms",
        "| batch | context | eager | piecewise | full graph | HBM floor | full/floor | full GB/s "
        "| launches/step | logits err | graph+greedy | greedy/floor | graph+top-k |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for row in results["rows"]:
        full = row.get("full_graph_ms", nan)
        launches = row["launches_per_step"]
        lines.append(
            f"| {row['batch']} | {row['context']} | {row['eager_ms']:.3f} | "
            f"{row.get('piecewise_ms', nan):.3f} | {full:.3f} | {row['floor_ms']:.3f} | "
            f"{full / row['floor_ms']:.2f} | {row.get('full_gbs', nan):.0f} | "
            f"{'n/a' if launches is None else launches} | "
            f"{row.get('full_max_abs_err', nan):.1e} | "
            f"{row.get('full_sample_greedy_ms', nan):.3f} | "
            f"{row.get('full_sample_greedy_ms', nan) / row['floor_ms']:.2f} | "
            f"{row.get('full_sample_topk_ms', nan):.3f} |"
        )
    if results["skipped"]:
        lines.append(f"skipped (KV over budget): {results['skipped']}")
    lines += [f"note: {note}" for note in results.get("notes", [])]
    lines += format_tensor_parallel(results)
    return "\n".join(lines)
