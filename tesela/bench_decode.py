"""`tesela bench decode`: one decode step by batch size and context, eager vs graphs vs the
HBM floor (weights + KV read once, at the measured copy bandwidth). JSON + PNG + table."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from tesela.bench import (
    copy_bandwidth,
    default_device,
    format_tensor_parallel,
    sync,
    tensor_parallel_results,
    weight_nbytes,
    write_outputs,
)
from tesela.core.forward_batch import ForwardBatch, ForwardMode
from tesela.distributed.launch import run_spmd
from tesela.engine.llm_engine import make_engine_config
from tesela.executor.model_runner import ModelRunner


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--batch-sizes", default="1,8,32,128")
    parser.add_argument("--contexts", default="512,4096")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument(
        "--kv-budget-gib",
        type=float,
        default=40.0,
        help="skip shapes whose KV cache would exceed this",
    )
    parser.add_argument("--output-dir", default="results")
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="ranks (GPUs) to split the model over"
    )


def run_decode(args: argparse.Namespace) -> int:
    """Every tensor-parallel rank runs the same batches (tesela/distributed/launch.py)."""
    return run_spmd(_run_decode, args.tensor_parallel_size, default_device(), args)


def _run_decode(tp, args: argparse.Namespace) -> int:
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    mc_config, _ = make_engine_config(args.model, dtype=args.dtype, num_kv_tokens=16)
    per_token = kv_bytes_per_token(mc_config)
    fits = [
        (b, c)
        for b in batch_sizes
        for c in contexts
        if b * c * per_token <= args.kv_budget_gib * 2**30
    ]
    tokens = max(b * c for b, c in fits) + 64
    config, path = make_engine_config(
        args.model,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        num_kv_tokens=tokens,
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
    weights = weight_nbytes(runner.model)
    results = {
        "model": args.model,
        "device": torch.cuda.get_device_name(runner.device),
        "dtype": config.dtype,
        "attention_backend": config.attention_backend,
        "copy_bandwidth_gbs": bandwidth / 1e9,
        "rows": [],
        "skipped": [(b, c) for b in batch_sizes for c in contexts if (b, c) not in fits],
    }
    for b, c in fits:
        batch = decode_batch(runner, b, c)
        row = {
            "batch": b,
            "context": c,
            "floor_ms": (weights + b * c * per_token) / bandwidth * 1e3,
        }
        row["eager_ms"], eager_out = time_step(runner, runner.forward_eager, batch, args.repeat)
        full, piecewise = runner.full_decode, runner.piecewise
        if full is not None and full.can_run(batch) is None:
            row["full_graph_ms"], out = time_step(runner, full.run, batch, args.repeat)
            row["full_max_abs_err"] = (out.float() - eager_out.float()).abs().max().item()
        if piecewise is not None and piecewise.can_run(batch) is None:
            row["piecewise_ms"], _ = time_step(runner, piecewise.run, batch, args.repeat)
        results["rows"].append(row)
    reports = [r for r in (runner.full_decode, runner.piecewise) if r is not None]
    graph_gib = {r.name: r.report().graph_memory_gib for r in reports}
    results.update(tensor_parallel_results(tp, runner, batch_sizes, graph_gib))
    if tp.rank == 0:
        write_outputs_decode(results, Path(args.output_dir))
        print(format_decode_table(results))
    return 0


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


def time_step(runner, fn, batch: ForwardBatch, repeat: int) -> tuple[float, torch.Tensor]:
    for _ in range(5):
        out = fn(batch)
    sync(runner.device)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(batch)
        sync(runner.device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), out.clone()


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
        for column in ("eager", "full_graph", "piecewise", "floor"):
            if f"{column}_ms" in row:
                flat["latency_ms"][f"{column}/{key}"] = row[f"{column}_ms"]
    size = results["tensor_parallel_size"]
    suffix = f"-tp{size}" if size > 1 else ""
    write_outputs(flat, output_dir, f"decode-{results['model']}{suffix}", plot=False)


def format_decode_table(results: dict) -> str:
    lines = [
        f"decode step {results['model']} ({results['dtype']}, attention "
        f"{results['attention_backend']}) on {results['device']}, copy "
        f"{results['copy_bandwidth_gbs']:.0f} GB/s: median ms",
        "| batch | context | eager | piecewise | full graph | HBM floor | full/floor | full err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for row in results["rows"]:
        full = row.get("full_graph_ms", nan)
        lines.append(
            f"| {row['batch']} | {row['context']} | {row['eager_ms']:.3f} | "
            f"{row.get('piecewise_ms', nan):.3f} | {full:.3f} | {row['floor_ms']:.3f} | "
            f"{full / row['floor_ms']:.2f} | {row.get('full_max_abs_err', nan):.1e} |"
        )
    if results["skipped"]:
        lines.append(f"skipped (KV over budget): {results['skipped']}")
    lines += format_tensor_parallel(results)
    return "\n".join(lines)
