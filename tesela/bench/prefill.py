"""`tesela bench prefill`: one-request prefill latency by graph mode (docs/bench-results.md).

One model is loaded once; every strategy runs over it: eager, torch.compile (default and
reduce-overhead), piecewise breakable, piecewise compiled (eager and inductor pieces), FULL mixed
graphs (the ladder's padded sizes, attention inside, tesela/executor/full_mixed.py) and a full
graph captured at each exact size (the launch-free floor for the same kernels). Besides the
one-request prefills, a mixed step (`--mixed`: decode rows plus one prefill chunk) runs through
every column. Latency is
host-visible (launch to synchronized result), median of repeated runs after warmup; the logits
of each column are compared with eager. Writes JSON + PNG and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tesela.bench.common import (
    add_model_arguments,
    add_output_argument,
    add_tensor_parallel_arguments,
    copy_bandwidth,
    device_name,
    int_list,
    pyplot,
    save_figure,
    sync,
    weight_nbytes,
    write_json,
)
from tesela.config import default_capture_sizes
from tesela.core.forward_batch import ForwardBatch
from tesela.core.forward_context import forward_context
from tesela.distributed.launch import all_reduce_latency_us, collective_latency_us, run_spmd
from tesela.engine.llm_engine import make_engine_config, resolve_model
from tesela.executor.graphs import graph_factory_for
from tesela.executor.model_runner import ModelRunner
from tesela.executor.piecewise.breakable import BreakablePiecewiseRunner
from tesela.executor.piecewise.compiled import CompiledPiecewiseRunner
from tesela.layers.norm import all_reduce_add_rms_norm

COLUMNS = (
    "eager",
    "compile",
    "compile-ro",
    "breakable",
    "compiled-eager",
    "compiled-inductor",
    "full-mixed",
    "full-graph",
)
MIXED_KEY = "mixed"


# Columns that capture CUDA graphs, and columns that build with inductor (C++ on a CPU: slow
# to build and not what this benchmark measures): both are skipped on CPU, with a note.
CUDA_ONLY_COLUMNS = ("compile-ro", "full-graph")
INDUCTOR_COLUMNS = ("compile", "compiled-inductor")


def runnable_columns(columns: list[str], device: torch.device) -> tuple[list[str], list[str]]:
    """(columns to run, notes on the ones skipped on this device)."""
    if device.type == "cuda":
        return columns, []
    kept = [c for c in columns if c not in CUDA_ONLY_COLUMNS + INDUCTOR_COLUMNS]
    notes = [
        f"skipped {c} on {device.type}: "
        + ("it captures CUDA graphs" if c in CUDA_ONLY_COLUMNS else "inductor builds C++ on CPU")
        for c in columns
        if c not in kept
    ]
    return kept, notes


def fitting_counts(counts: list[int], max_positions: int, what: str) -> tuple[list[int], list[str]]:
    """Drop the sizes the model's context cannot hold (e.g. 4096 on `tiny`), with a note."""
    kept = [n for n in counts if n <= max_positions]
    notes = [
        f"skipped {what} {n}: over the model's {max_positions} positions"
        for n in counts
        if n not in kept
    ]
    if not kept:
        raise ValueError(
            f"every {what} exceeds the model's {max_positions} positions: pass smaller ones"
        )
    return kept, notes


def add_prefill_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--num-tokens", default="16,64,256,1024,4096", help="prompt lengths to time"
    )
    parser.add_argument(
        "--columns",
        default=",".join(COLUMNS),
        help="what to time (GPU-only ones are skipped on CPU, with a note)",
    )
    parser.add_argument("--repeat", type=int, default=30, help="timed runs per cell")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per cell first")
    add_output_argument(parser)
    parser.add_argument(
        "--mixed",
        default="31x512+512",
        help="the mixed step: DECODE_ROWSxCONTEXT+CHUNK (decode rows with CONTEXT cached tokens "
        "each, plus one first prefill chunk of CHUNK tokens); 'none' to skip",
    )
    parser.add_argument(
        "--max-rows", type=int, default=256, help="rows a FULL mixed graph holds (max_num_seqs)"
    )
    add_tensor_parallel_arguments(parser)


def parse_mixed(text: str) -> tuple[int, int, int] | None:
    """'31x512+512' -> (31 decode rows, 512 cached tokens each, a 512-token chunk)."""
    if text == "none":
        return None
    try:
        rows, rest = text.split("x")
        context, chunk = rest.split("+")
        return int(rows), int(context), int(chunk)
    except ValueError:
        raise ValueError(
            f"--mixed takes ROWSxCONTEXT+CHUNK (e.g. 31x512+512), got {text!r}"
        ) from None


def run_prefill(args: argparse.Namespace) -> int:
    """Every tensor-parallel rank runs the same columns and batches
    (tesela/distributed/launch.py); rank 0 reports."""
    return run_on_ranks(_run_prefill, args)


def _run_prefill(tp, args: argparse.Namespace) -> int:
    model_config, _ = resolve_model(args.model)
    counts, notes = fitting_counts(
        int_list(args.num_tokens, "--num-tokens"),
        model_config.max_position_embeddings,
        "num_tokens",
    )
    requested = [c for c in args.columns.split(",") if c]
    unknown = sorted(set(requested) - set(COLUMNS))
    if unknown:
        raise ValueError(
            f"unknown column(s) {', '.join(unknown)}: choose from {', '.join(COLUMNS)}"
        )
    mixed = parse_mixed(args.mixed)
    mixed_tokens = 0 if mixed is None else mixed[0] * (mixed[1] + 16) + mixed[2]
    config, path = make_engine_config(
        args.model,
        dtype=args.dtype,
        device=args.device,
        disable_cudagraph=True,
        attention_backend=args.attention_backend,
        num_kv_tokens=max(counts) + 64 + mixed_tokens,
        max_num_batched_tokens=max(counts),
        max_num_seqs=args.max_rows,
        tensor_parallel_size=tp.size,
    )
    runner = ModelRunner(config, path, tp)
    columns, skipped = runnable_columns(requested, runner.device)
    bench = PrefillBench(runner, counts, args.repeat, args.warmup, mixed)
    results = bench.run(columns)
    results["notes"] = notes + skipped
    graph_gib = {c: b.get("graph_gib") for c, b in results["build"].items()}
    results.update(tensor_parallel_results(tp, runner, counts, graph_gib))
    if tp.rank == 0:
        suffix = "" if requested == list(COLUMNS) else "-" + "-".join(requested)
        suffix += f"-tp{tp.size}" if tp.size > 1 else ""
        write_outputs(results, Path(args.output_dir), f"prefill-{args.model}{suffix}")
        print(format_table(results))
    return 0


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_on_ranks(fn, args: argparse.Namespace) -> int:
    """`fn(tp, args)` on each of `--tensor-parallel-size` ranks (one process each past 1, with
    `--custom-all-reduce` if given); rank 0's result."""
    device = args.device if args.device != "auto" else default_device()
    return run_spmd(
        fn,
        args.tensor_parallel_size,
        device,
        args,
        custom_all_reduce=args.custom_all_reduce,
        fused_all_reduce_add_norm=args.fused_all_reduce_add_norm,
    )


def tensor_parallel_results(tp, runner, token_counts: list[int], graph_gib) -> dict:
    """Per layer (two reductions: after attention and after the MLP) at each token count: the
    plain all-reduce, and the all-reduce + residual add + RMSNorm the layers run (one kernel
    where the group fuses it and the batch is decode-sized); every rank's graph memory."""
    if tp.size == 1:
        return {"tensor_parallel_size": 1}
    hidden = runner.config.model_config.hidden_size
    return {
        "tensor_parallel_size": tp.size,
        "all_reduce": str(tp.all_reduce),
        "all_reduce_add_norm": str(tp.all_reduce_add_norm),
        "all_reduce_us_per_layer": {
            str(n): 2 * all_reduce_latency_us(tp, (n, hidden), runner.dtype, runner.device)
            for n in token_counts
        },
        "all_reduce_add_norm_us_per_layer": {
            str(n): 2 * all_reduce_add_norm_latency_us(tp, runner, n) for n in token_counts
        },
        "graph_gib_per_rank": tp.all_gather_object(graph_gib),
    }


def all_reduce_add_norm_latency_us(tp, runner, tokens: int) -> float:
    """Median microseconds of one all-reduce + residual add + RMSNorm of `tokens` rows of the
    model's width, as the decoder layers call it."""
    hidden, eps = runner.config.model_config.hidden_size, runner.config.model_config.rms_norm_eps
    x, residual = (
        torch.zeros(tokens, hidden, dtype=runner.dtype, device=runner.device) for _ in range(2)
    )
    weight = torch.ones(hidden, dtype=runner.dtype, device=runner.device)
    return collective_latency_us(
        tp, lambda: all_reduce_add_rms_norm(x, residual, weight, eps, tp), runner.device
    )


def format_tensor_parallel(results: dict) -> list[str]:
    if results.get("tensor_parallel_size", 1) == 1:
        return []

    def per_layer(key: str) -> str:
        return ", ".join(f"n={n}: {us:.1f}" for n, us in results.get(key, {}).items())

    return [
        f"tensor parallel size {results['tensor_parallel_size']}; all-reduce: "
        f"{results['all_reduce']}",
        f"all-reduce + add + norm: {results.get('all_reduce_add_norm', 'unfused')}",
        "us per layer (2 per layer, captured in a CUDA graph on GPUs): all-reduce "
        f"{per_layer('all_reduce_us_per_layer')}; all-reduce + add + norm "
        f"{per_layer('all_reduce_add_norm_us_per_layer')}",
        f"graph memory per rank (GiB): {results['graph_gib_per_rank']}",
    ]


def merge_results(paths: list[Path]) -> dict:
    """One result from several runs of the same model and card (e.g. one process per column,
    so a failing column cannot take the others down)."""
    merged: dict = {}
    for path in paths:
        part = json.loads(Path(path).read_text())
        if not merged:
            merged = part
            continue
        if (part["model"], part["device"]) != (merged["model"], merged["device"]):
            raise ValueError(f"{path} is another model or card than {paths[0]}")
        for key in ("latency_ms", "launch_ms", "split_us", "spread_ms", "max_abs_err", "build"):
            merged.setdefault(key, {}).update(part.get(key, {}))
    return merged


def main_merge(argv: list[str]) -> int:
    """python -m tesela.bench OUT.json IN.json...: merge, write JSON + PNG, print the table."""
    out, *inputs = (Path(a) for a in argv)
    results = merge_results(inputs)
    # Per-column runs compare with eager only when eager ran in the same process: redo it here.
    eager = {n: results["latency_ms"].get(f"eager/{n}") for n in results["num_tokens"]}
    results["eager_in_every_run"] = all(v is not None for v in eager.values())
    write_outputs(results, out.parent, out.stem)
    print(format_table(results))
    return 0


class PrefillBench:
    def __init__(
        self,
        runner,
        counts: list[int],
        repeat: int,
        warmup: int,
        mixed: tuple[int, int, int] | None = None,
    ) -> None:
        self.runner = runner
        self.counts = counts
        self.mixed = mixed
        self.repeat = repeat
        self.warmup = warmup
        self.device = runner.device
        self.results: dict = {
            "model": runner.config.model,
            "device": device_name(self.device),
            "dtype": runner.config.dtype,
            "attention_backend": runner.config.attention_backend,
            "num_tokens": counts,
            "mixed": mixed,
            "latency_ms": {},
            "launch_ms": {},
            "split_us": {},
            "spread_ms": {},
            "max_abs_err": {},
            "build": {},
        }

    @property
    def workloads(self) -> list:
        return self.counts + ([MIXED_KEY] if self.mixed else [])

    @property
    def max_num_tokens(self) -> int:
        mixed = self.mixed[0] + self.mixed[2] if self.mixed else 0
        return max(*self.counts, mixed)

    def batch(self, n: int | str) -> ForwardBatch:
        if n == MIXED_KEY:
            return self.mixed_batch()
        generator = torch.Generator().manual_seed(n)
        tokens = torch.randint(
            0, self.runner.config.model_config.vocab_size, (n,), generator=generator
        ).tolist()
        blocks = list(range(1, n // self.runner.kv_cache.block_size + 2))
        return ForwardBatch.build(
            token_ids=[tokens],
            prefix_lens=[0],
            block_tables=[blocks],
            block_size=self.runner.kv_cache.block_size,
            device=self.device,
        )

    def mixed_batch(self) -> ForwardBatch:
        """Decode rows over cached contexts (random K/V, see `run`) plus one first chunk."""
        rows, context, chunk = self.mixed
        block_size = self.runner.kv_cache.block_size
        vocab = self.runner.config.model_config.vocab_size
        generator = torch.Generator().manual_seed(rows * context + chunk)
        lengths = [(context, 1)] * rows + [(0, chunk)]
        tables, next_block = [], 1
        for prefix, n in lengths:
            blocks = -(-(prefix + n) // block_size)
            tables.append(list(range(next_block, next_block + blocks)))
            next_block += blocks
        return ForwardBatch.build(
            token_ids=[
                torch.randint(0, vocab, (n,), generator=generator).tolist() for _, n in lengths
            ],
            prefix_lens=[p for p, _ in lengths],
            block_tables=tables,
            block_size=block_size,
            device=self.device,
        )

    def time(
        self, fn: Callable[[ForwardBatch], torch.Tensor], n: int | str
    ) -> tuple[list[float], list[float], torch.Tensor]:
        """Host-visible ms per run, and host ms until `fn` returned (launch side, before the
        sync: the host work of planning, copies and replay launches, GPU work overlapping)."""
        batch = self.batch(n)
        for _ in range(self.warmup):
            out = fn(batch)
        sync(self.device)
        samples, launches = [], []
        for _ in range(self.repeat):
            batch = self.batch(n)
            start = time.perf_counter()
            out = fn(batch)
            launched = time.perf_counter()
            sync(self.device)
            samples.append((time.perf_counter() - start) * 1e3)
            launches.append((launched - start) * 1e3)
        logits = self.runner.compute_logits(out[-1:].clone())
        return samples, launches, logits

    def run(self, columns: list[str]) -> dict:
        self.results["hbm_floor_ms"] = self.hbm_floor_ms()
        for pool in (*self.runner.kv_cache.k_buffers, *self.runner.kv_cache.v_buffers):
            pool.normal_()  # decode rows of the mixed step attend over random contexts
        reference = {}
        for column in columns:
            try:
                fn = self.make(column)
            except Exception as error:  # a column that cannot build is reported, not fatal
                self.results["build"][column] = {"error": f"{type(error).__name__}: {error}"}
                continue
            for n in self.workloads:
                print(f"bench prefill: {column} n={n}", file=sys.stderr, flush=True)
                samples, launches, logits = self.time(fn, n)
                key = f"{column}/{n}"
                self.results["latency_ms"][key] = statistics.median(samples)
                self.results["launch_ms"][key] = statistics.median(launches)
                self.results["spread_ms"][key] = (min(samples), max(samples))
                if column == "breakable":
                    self.results["split_us"][key] = self.split_us(n)
                if column == "eager":
                    reference[n] = logits
                elif n in reference:
                    self.results["max_abs_err"][key] = (logits - reference[n]).abs().max().item()
            torch.compiler.reset() if column.startswith("compile") else None
        return self.results

    @torch.inference_mode()
    def make(self, column: str) -> Callable[[ForwardBatch], torch.Tensor]:
        runner = self.runner
        if column == "eager":
            return runner.forward_eager
        if column in ("compile", "compile-ro"):
            mode = "reduce-overhead" if column == "compile-ro" else None
            compiled = torch.compile(runner.model, mode=mode)
            return self._with_context(lambda b: compiled(b.input_ids, b.positions))
        if column == "full-graph":
            return FullGraphs(runner)
        if column == "full-mixed":
            return self._full_mixed()
        mode, compiler = {
            "breakable": ("breakable", "eager"),
            "compiled-eager": ("compiled", "eager"),
            "compiled-inductor": ("compiled", "inductor"),
        }[column]
        return self._piecewise(column, mode, compiler)

    def split_us(self, n: int | str) -> float:
        """Median host us of one split call of a breakable replay (the calls alone, timed
        inside the replay; planning, copies and segment launches excluded)."""
        samples = []
        for _ in range(self.repeat):
            samples.append(self.breakable.split_host_seconds(self.batch(n)))
            sync(self.device)  # a full launch queue would block the timed host side
        return statistics.median(samples) * 1e6

    def _with_context(self, fn):
        def run(batch: ForwardBatch) -> torch.Tensor:
            plan = self.runner.planner.plan(batch)
            with torch.inference_mode(), forward_context(batch, plan, self.runner.attn_backend):
                return fn(batch)

        return run

    def _piecewise(self, column: str, mode: str, compiler: str):
        runner = self.runner
        collaborators = dict(
            model=runner.model,
            planner=runner.planner,
            capture_sizes=default_capture_sizes(self.max_num_tokens),
            block_size=runner.kv_cache.block_size,
            graphs=graph_factory_for(runner.device),
        )
        if mode == "compiled":
            piecewise = CompiledPiecewiseRunner(piecewise_compiler=compiler, **collaborators)
        else:
            piecewise = self.breakable = BreakablePiecewiseRunner(**collaborators)
        report = piecewise.capture()
        self.results["build"][column] = {
            "seconds": report.seconds,
            "graph_gib": report.graph_memory_gib,
            "sizes": len(report.sizes),
            "pieces": report.segments_per_size,
        }
        return piecewise.run

    def _full_mixed(self):
        runner = self.runner
        full = runner.add_full_mixed(
            default_capture_sizes(self.max_num_tokens),
            runner.config.scheduler.max_num_seqs,
            runner.config.scheduler.max_model_len,
        )
        report = full.report()
        self.results["build"]["full-mixed"] = {
            "seconds": report.seconds,
            "graph_gib": report.graph_memory_gib,
            "sizes": len(report.sizes),
            "max_rows": full.max_rows,
        }
        return full.run

    def hbm_floor_ms(self) -> float | None:
        if self.device.type != "cuda":
            return None
        bandwidth = copy_bandwidth(self.device)
        weight_bytes = weight_nbytes(self.runner.model)
        self.results["copy_bandwidth_gbs"] = bandwidth / 1e9
        self.results["weight_gib"] = weight_bytes / 2**30
        return weight_bytes / bandwidth * 1e3


class FullGraphs:
    """The whole forward captured at each exact batch (attention inside, its metadata fixed):
    what a launch-free run of the same kernels costs."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.graphs: dict[int, tuple] = {}
        self.pool = torch.cuda.graph_pool_handle()

    @torch.inference_mode()
    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        n = batch.num_tokens
        if n not in self.graphs:
            self.graphs[n] = self._capture(batch)
        graph, output, captured, _metadata = self.graphs[n]
        # Same shape, so the captured metadata is valid; copy the new tokens in.
        captured.input_ids.copy_(batch.input_ids)
        graph.replay()
        return output

    def _capture(self, batch: ForwardBatch):
        runner = self.runner
        runner.forward_eager(batch)  # warmup
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            runner.forward_eager(batch)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        plan = runner.planner.plan(batch)
        context = forward_context(batch, plan, runner.attn_backend)
        with torch.cuda.graph(graph, pool=self.pool), context:
            output = runner.model(batch.input_ids, batch.positions)
        # The graph reads the plan's device tensors: keep them alive with it.
        return graph, output, batch, plan


def write_outputs(results: dict, output_dir: Path, name: str, plot: bool = True) -> None:
    json_path = write_json(results, output_dir, name)
    plt = pyplot(json_path) if plot else None
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    columns = sorted({k.split("/")[0] for k in results["latency_ms"]}, key=COLUMNS.index)
    for column in columns:
        xs = [n for n in results["num_tokens"] if f"{column}/{n}" in results["latency_ms"]]
        ax.plot(xs, [results["latency_ms"][f"{column}/{n}"] for n in xs], marker="o", label=column)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="num_tokens",
        ylabel="ms (host-visible median)",
        title=f"prefill {results['model']} on {results['device']}",
    )
    ax.legend(fontsize=8)
    save_figure(fig, output_dir, name)


def format_table(results: dict) -> str:
    latency = results["latency_ms"]
    columns = [c for c in COLUMNS if any(k.startswith(f"{c}/") for k in latency)]
    lines = [
        f"prefill {results['model']} ({results['dtype']}, attention "
        f"{results['attention_backend']}) on {results['device']}: median ms"
    ]
    # (label, numerator column, denominator column)
    ratios = (
        ("breakable/full", "breakable", "full-graph"),
        ("full-mixed/full", "full-mixed", "full-graph"),
        ("eager/breakable", "eager", "breakable"),
    )
    split_us = results.get("split_us", {})
    # Host us of one breakable split call (the calls alone, timed inside a replay).
    extra = ["split us"] if split_us else []
    lines.append("| n | " + " | ".join(columns + [r[0] for r in ratios] + extra) + " |")
    lines.append("|---" * (len(columns) + len(ratios) + len(extra) + 1) + "|")
    workloads = list(results["num_tokens"]) + ([MIXED_KEY] if results.get("mixed") else [])
    nan = float("nan")
    for n in workloads:
        row = [f"{latency.get(f'{c}/{n}', nan):.3f}" for c in columns]
        for _, top, bottom in ratios:
            row.append(f"{latency.get(f'{top}/{n}', nan) / latency.get(f'{bottom}/{n}', nan):.3f}")
        if extra:
            row.append(f"{split_us.get(f'breakable/{n}', nan):.1f}")
        label = n if n != MIXED_KEY else "mixed {}x{}+{}".format(*results["mixed"])
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    if results.get("hbm_floor_ms"):
        lines.append(
            f"HBM floor (weights {results['weight_gib']:.2f} GiB at "
            f"{results['copy_bandwidth_gbs']:.0f} GB/s): {results['hbm_floor_ms']:.3f} ms"
        )
    launch = results.get("launch_ms", {})
    for column in ("breakable", "full-mixed"):
        pieces = results["build"].get(column, {}).get("pieces", 2)
        # A breakable replay of P segments makes P - 1 split calls.
        splits = max(pieces - 1, 1) if column == "breakable" else 1
        per = [
            f"n={n} {launch[f'{column}/{n}'] * 1e3:.0f} us"
            + (f" ({launch[f'{column}/{n}'] * 1e3 / splits:.1f} us/split)" if splits > 1 else "")
            for n in workloads
            if f"{column}/{n}" in launch
        ]
        if per:
            lines.append(f"host launch time {column}: " + ", ".join(per))
    for column, build in results["build"].items():
        lines.append(f"build {column}: {build}")
    lines += [f"note: {note}" for note in results.get("notes", [])]
    errors = results["max_abs_err"]
    if errors:
        worst = {
            c: max((v for k, v in errors.items() if k.startswith(f"{c}/")), default=0.0)
            for c in columns
            if c != "eager"
        }
        lines.append("max |logits - eager|: " + ", ".join(f"{c} {v:.2e}" for c, v in worst.items()))
    lines += format_tensor_parallel(results)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main_merge(sys.argv[1:]))
