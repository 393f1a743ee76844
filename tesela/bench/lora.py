"""`tesela bench lora`: the cost of serving LoRA adapters, against the base model.

For each batch size, a decode step (every row one token after `--context` cached tokens) and a
prefill of `--prefill-tokens` tokens split over the batch's rows, each row served by one of
`--num-adapters` random adapters of rank `--rank` (round robin), eager and with graphs through
the dispatcher, so each batch takes the path that serves it in production (FULL decode graphs
for decode; FULL mixed graphs for prefill when `--full-mixed on`, the default, else piecewise;
the table names the path); the same shapes on the base model (LoRA off) side by side. "graphs"
times one synchronous step (host planning and launch included); "pipelined" times steps issued
back to back without reading tokens back, the device's pace, as the engine's overlap scheduler
runs decode (`pipelined_ms`), so host noise between processes does not move it. Also the
graph memory of both engines, per graph set. Runs on `tiny` on CPU (no capture there: the graph
columns run the CPU path of the same runners). JSON + a table printed last.
"""

from __future__ import annotations

import argparse
import functools
import gc
import tempfile
from pathlib import Path

import torch

from tesela.bench.common import pipelined_ms
from tesela.bench.decode import device_step, time_step
from tesela.bench.prefill import write_outputs
from tesela.core.forward_batch import ForwardBatch, ForwardMode


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="qwen3-0.6b", help="model folder or preset")
    parser.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--batch-sizes", default="1,8,32", help="rows per batch, comma-separated")
    parser.add_argument(
        "--prefill-tokens", type=int, default=1024, help="prefill tokens, split over the rows"
    )
    parser.add_argument("--context", type=int, default=512, help="cached tokens per decode row")
    parser.add_argument("--num-adapters", type=int, default=4, help="adapters, round robin")
    parser.add_argument("--rank", type=int, default=16, help="rank of every adapter")
    parser.add_argument("--repeat", type=int, default=30, help="timed runs per cell (median)")
    parser.add_argument(
        "--full-mixed", choices=["on", "off"], default="on",
        help="FULL mixed graphs for prefill (on: as served; off: piecewise graphs)",
    )  # fmt: skip
    parser.add_argument("--output-dir", default="results", help="where the JSON goes")


def build_runner(args, batch_sizes: list[int], lora: bool):
    from tesela.engine.llm_engine import make_engine_config
    from tesela.executor.model_runner import ModelRunner

    max_bs = max(batch_sizes)
    tokens = max_bs * (args.context + 16) + args.prefill_tokens + 64
    # A prefill row of all the tokens must fit a row of the graphs' block tables, or FULL
    # mixed graphs would refuse it (context_too_long) and the prefill would run piecewise.
    max_model_len = max(args.context, args.prefill_tokens) + 16
    prefill_sizes = sorted({args.prefill_tokens, *batch_sizes})
    config, path = make_engine_config(
        args.model,
        dtype=args.dtype,
        device=args.device,
        num_kv_tokens=tokens,
        max_num_seqs=max_bs,
        max_num_batched_tokens=max(args.prefill_tokens, max_bs),
        max_model_len=max_model_len,
        piecewise_cudagraph="breakable",
        full_mixed=args.full_mixed == "on",
        capture_sizes=prefill_sizes,
        enable_lora=lora,
        max_loras=args.num_adapters,
        max_lora_rank=args.rank,
    )
    return ModelRunner(config, path)


def bench_batch(runner, rows: list[tuple[int, int]], lora_ids: list[int], mode) -> ForwardBatch:
    """rows: (prefix_len, new_tokens), each in its own blocks (past the dummy block)."""
    block_size = runner.kv_cache.block_size
    generator = torch.Generator().manual_seed(len(rows) * 7919 + sum(n for _, n in rows))
    vocab = runner.config.model_config.vocab_size
    token_ids, tables, next_block = [], [], 1
    for prefix, n in rows:
        token_ids.append(torch.randint(0, vocab, (n,), generator=generator).tolist())
        blocks = -(-(prefix + n) // block_size)
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    return ForwardBatch.build(
        token_ids=token_ids,
        prefix_lens=[p for p, _ in rows],
        block_tables=tables,
        block_size=block_size,
        device=runner.device,
        mode=mode,
        lora_ids=lora_ids,
    )


def measure(runner, args, batch_sizes: list[int], adapters: int) -> dict:
    """Median ms per (phase, batch, path); `adapters` = 0 runs the base model."""
    dispatcher, out = runner.dispatcher, {}
    for b in batch_sizes:
        ids = [1 + r % adapters if adapters else 0 for r in range(b)]
        decode = bench_batch(runner, [(args.context - 1, 1)] * b, ids, ForwardMode.DECODE)
        chunk = args.prefill_tokens // b
        prefill = bench_batch(runner, [(0, chunk)] * b, ids, ForwardMode.EXTEND)
        for phase, batch in (("decode", decode), ("prefill", prefill)):
            out[f"{phase}/b{b}/eager"], eager = time_step(
                runner, runner.forward_eager, batch, args.repeat
            )
            path, _ = dispatcher.choose(batch)
            out[f"{phase}/b{b}/graphs"], replay = time_step(
                runner, dispatcher.run, batch, args.repeat
            )
            out[f"{phase}/b{b}/graphs_path"] = path.value
            out[f"{phase}/b{b}/pipelined"] = pipelined_ms(
                functools.partial(device_step, dispatcher.run, runner), batch, runner.device
            )
            out[f"{phase}/b{b}/max_abs_err"] = (replay.float() - eager.float()).abs().max().item()
    reports = dispatcher.reports()
    out["graph_memory_bytes"] = sum(r.graph_memory_bytes for r in reports)
    out["graph_memory_by_set"] = {r.mode: r.graph_memory_bytes for r in reports}
    out["lora_memory_bytes"] = runner.lora_manager.nbytes if runner.lora_manager else 0
    return out


def run_lora(args: argparse.Namespace) -> int:
    from tesela.lora.adapter import write_random_adapter
    from tesela.lora.request import LoRARequest

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    results: dict = {"model": args.model, "rank": args.rank, "adapters": args.num_adapters}
    results["full_mixed"] = args.full_mixed
    base = build_runner(args, batch_sizes, lora=False)
    results["device"] = _device_name(base.device)
    results["dtype"] = base.config.dtype
    results["base"] = measure(base, args, batch_sizes, adapters=0)
    model_config = base.config.model_config
    del base
    _release_memory()
    lora = build_runner(args, batch_sizes, lora=True)
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.num_adapters):
            path = write_random_adapter(
                Path(folder) / f"a{i}", model_config, rank=args.rank, seed=i
            )
            lora.lora_manager.add_adapter(LoRARequest(f"a{i}", i + 1, str(path)))
        results["lora"] = measure(lora, args, batch_sizes, adapters=args.num_adapters)
    results["lora_launches_per_layer"] = launches_per_layer(lora, model_config, args, batch_sizes)
    results["batch_sizes"] = batch_sizes
    write_outputs(results, Path(args.output_dir), f"lora-{args.model}", plot=False)
    print(format_lora_table(results))
    return 0


def launches_per_layer(runner, model_config, args, batch_sizes: list[int]) -> dict[str, int]:
    """LoRA kernel launches one decoder layer adds to its base GEMMs, per cell ("decode/b8",
    "prefill/b32"), as the layers choose them (tesela/lora/layer.py): none per target where the
    one-launch fused GEMM runs, the shrink where the prefill-sized one does, else gather's one
    (decode) or sgmv's two (prefill)."""
    from tesela.lora.layer import launches_per_target
    from tesela.lora.tiles import GATHER, SGMV

    modules = list(runner.lora_manager.modules.values())
    modules = modules[: len(modules) // model_config.num_hidden_layers]  # the first layer's
    counts = {}
    for b in batch_sizes:
        cells = (("decode", b, GATHER), ("prefill", args.prefill_tokens // b * b, SGMV))
        for phase, tokens, style in cells:
            counts[f"{phase}/b{b}"] = sum(launches_per_target(m, tokens, style) for m in modules)
    return counts


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def format_lora_table(results: dict) -> str:
    base, lora = results["base"], results["lora"]
    lines = [
        f"LoRA cost, {results['model']} ({results['dtype']}) on {results['device']}: "
        f"{results['adapters']} adapters of rank {results['rank']}, median ms",
        "| phase | batch | path | base eager | lora eager | base graphs | lora graphs | "
        "lora/base (graphs) | base pipelined | lora pipelined | lora/base (pipelined) | "
        "lora graph err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in ("decode", "prefill"):
        for b in results["batch_sizes"]:
            key = f"{phase}/b{b}"
            ratio = lora[f"{key}/graphs"] / base[f"{key}/graphs"]
            pipelined = lora[f"{key}/pipelined"] / base[f"{key}/pipelined"]
            lines.append(
                f"| {phase} | {b} | {lora[f'{key}/graphs_path']} | {base[f'{key}/eager']:.3f} | "
                f"{lora[f'{key}/eager']:.3f} | {base[f'{key}/graphs']:.3f} | "
                f"{lora[f'{key}/graphs']:.3f} | {ratio:.2f} | {base[f'{key}/pipelined']:.3f} | "
                f"{lora[f'{key}/pipelined']:.3f} | {pipelined:.2f} | "
                f"{lora[f'{key}/max_abs_err']:.1e} |"
            )
    launches = results["lora_launches_per_layer"]
    lines.append(
        "LoRA kernel launches per layer, beside the base GEMMs (0 per target: the one-launch "
        "fused GEMM; 1: gather, or the shrink before the prefill-sized fused GEMM; 2: sgmv): "
        + "; ".join(
            f"{phase} "
            + ", ".join(f"b{b} {launches[f'{phase}/b{b}']}" for b in results["batch_sizes"])
            for phase in ("decode", "prefill")
        )
    )
    gib, base_graphs = 2**30, base["graph_memory_bytes"]
    growth = f"{lora['graph_memory_bytes'] / base_graphs:.2f}x" if base_graphs else "n/a on CPU"
    lines.append(
        f"graph memory: base {base_graphs / gib:.3f} GiB, with LoRA "
        f"{lora['graph_memory_bytes'] / gib:.3f} GiB ({growth}); LoRA slots "
        f"{lora['lora_memory_bytes'] / gib:.3f} GiB"
    )
    for mode, nbytes in base["graph_memory_by_set"].items():
        with_lora = lora["graph_memory_by_set"].get(mode, 0)
        lines.append(f"  {mode}: base {nbytes / gib:.3f} GiB, with LoRA {with_lora / gib:.3f} GiB")
    return "\n".join(lines)
