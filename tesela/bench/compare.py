"""`tesela bench compare`: this checkout's decode step against other checkouts, in one process.

Separate processes on one GPU host time the same code up to 25% apart (clocks, placement,
whatever the process drew), more than most commits change, so `bench decode` run once per tree
cannot tell them apart. This benchmark runs every tree in one process instead. Each *side*
builds its own ModelRunner (random weights, KV cache, FULL decode graphs) from its own code:

- `current`: this checkout (the `tesela` package imported here);
- each `--baseline [NAME=]PATH`: another checkout's root (a `git worktree`, or a `git archive`
  of an older commit). Its `tesela` package is copied to a temporary folder as `tesela_NAME`,
  every `tesela` identifier in it renamed (imports, custom-op namespace, logger names), so both
  import side by side without sharing a module, an op or a cache.

Then `--rounds` rounds time every side's cells in turn: per (batch size, context), `--repeat`
decode steps (the FULL decode graph replay, then the LM head and argmax) queued back to back
and timed with CUDA events, so the figure is GPU time per step, the host hidden behind it. A
row also gives each side's first greedy tokens: with the same random weights, sides whose
numerics differ may still pick another token where two logits nearly tie.

The baseline must have what this module calls (tesela/bench/decode.py's `decode_batch`,
`ModelRunner.full_decode`, `make_engine_config` with these keywords): checkouts since FULL
decode graphs do.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from tesela.bench.common import (
    add_model_arguments,
    add_output_argument,
    device_name,
    int_list,
    sync,
    write_json,
)
from tesela.bench.latency import check_full_length, random_prompts

PACKAGE = "tesela"
_IDENTIFIER = re.compile(rf"\b{PACKAGE}\b")


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="another checkout's root to compare against (repeatable; NAME defaults to the "
        "folder's name)",
    )
    parser.add_argument(
        "--reference",
        default=None,
        help="the side the ratios divide by (default: the first baseline)",
    )
    parser.add_argument("--batch-sizes", default="1,32", help="decode batch sizes")
    parser.add_argument("--contexts", default="512", help="tokens cached per row")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every side")
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="per cell and round: timed steps (default 100), or with --end-to-end timed "
        "generate calls (default 2)",
    )
    parser.add_argument(
        "--end-to-end",
        action="store_true",
        help="time each side's offline engine instead (LLM.generate: scheduling, every step, "
        "sampling, detokenization) on --input-len random prompt tokens and --output-len new "
        "tokens per request",
    )
    parser.add_argument("--input-len", type=int, default=128, help="--end-to-end prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="--end-to-end new tokens")
    add_output_argument(parser, "the JSON")


def import_checkout(root: Path, name: str, into: Path) -> ModuleType:
    """The `tesela` package of the checkout at `root`, imported as `tesela_<name>`: copied
    under `into` with every `tesela` identifier of its Python files renamed."""
    source = root / PACKAGE
    if not (source / "__init__.py").is_file():
        raise ValueError(
            f"{root} has no {PACKAGE}/ package: pass a checkout's root (a git worktree or a "
            "`git archive` of a commit)"
        )
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ValueError(f"a baseline's name must be letters, digits and _, got {name!r}")
    package = f"{PACKAGE}_{name}"
    if package in sys.modules:  # its custom ops are registered for good: no second copy
        raise ValueError(f"a baseline named {name!r} was imported in this process already")
    target = into / package
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    for path in target.rglob("*.py"):
        path.write_text(_IDENTIFIER.sub(package, path.read_text()))
    if str(into) not in sys.path:
        sys.path.insert(0, str(into))
    return importlib.import_module(package)


def parse_baseline(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep:
        path = text
        name = Path(text).resolve().name
    return re.sub(r"\W", "_", name), Path(path)


@dataclass
class Side:
    """One tree's runner and its batches."""

    name: str
    package: str
    runner: object = None
    batches: dict = field(default_factory=dict)  # (batch size, context) -> ForwardBatch
    times: dict = field(default_factory=dict)  # (batch size, context) -> [ms per round]
    tokens: dict = field(default_factory=dict)  # (batch size, context) -> first greedy tokens

    def module(self, name: str) -> ModuleType:
        return importlib.import_module(f"{self.package}.{name}")

    def build(self, args, sizes: list[int], contexts: list[int]) -> None:
        make = self.module("engine.llm_engine").make_engine_config
        config, path = make(
            args.model,
            dtype=args.dtype,
            device=args.device,
            attention_backend=args.attention_backend,
            num_kv_tokens=max(sizes) * (max(contexts) + 16) + 64,
            max_num_seqs=max(sizes),
            max_model_len=max(contexts) + 16,
            capture_sizes=sizes,
            full_mixed=False,
            piecewise_cudagraph="none",
        )
        self.runner = self.module("executor.model_runner").ModelRunner(config, path)
        for pool in (*self.runner.kv_cache.k_buffers, *self.runner.kv_cache.v_buffers):
            pool.normal_()  # random K/V, as `bench decode` fills them
        decode_batch = self.module("bench.decode").decode_batch
        for b in sizes:
            for c in contexts:
                self.batches[b, c] = decode_batch(self.runner, b, c)
                self.times[b, c] = []

    def forward(self, batch):
        """The forward a decode step of `batch` runs: ("full graph", the FULL decode graph's
        replay) where one was captured for it, else ("eager", the eager forward)."""
        full = self.runner.full_decode
        if full is not None and full.can_run(batch) is None:
            return "full graph", full.run
        return "eager", self.runner.forward_eager

    @property
    def device(self) -> torch.device:
        return self.runner.device

    def path(self, key) -> str:
        return self.forward(self.batches[key])[0]

    def first_tokens(self, key) -> list[int]:
        return self.step(self.batches[key])[:4].tolist()

    @torch.inference_mode()
    def step(self, batch) -> torch.Tensor:
        """One decode step, queued: the forward, the LM head and argmax."""
        hidden = self.forward(batch)[1](batch)
        return self.runner.compute_logits(hidden[batch.logits_indices]).argmax(dim=-1)

    def time_cell(self, key, repeat: int) -> float:
        """ms per step of `repeat` steps queued back to back (CUDA events on a GPU)."""
        batch = self.batches[key]
        device = self.device
        self.step(batch)  # warm
        sync(device)
        if device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            for _ in range(repeat):
                self.step(batch)
            end.record()
            sync(device)
            return start.elapsed_time(end) / repeat
        start = time.perf_counter()
        for _ in range(repeat):
            self.step(batch)
        return (time.perf_counter() - start) * 1e3 / repeat


@dataclass
class EndToEndSide(Side):
    """One tree's offline engine, timed through `LLM.generate` (the same prompts on every
    side): what a user of the engine sees, host work and overlap scheduling included. A cell is
    (batch size, prompt tokens); its figure is ms per output token step."""

    llm: object = None
    params: object = None

    def build(self, args, sizes: list[int], contexts: list[int]) -> None:
        total = args.input_len + args.output_len + 16
        self.llm = self.module("engine.llm").LLM(
            args.model,
            dtype=args.dtype,
            device=args.device,
            attention_backend=args.attention_backend,
            max_num_seqs=max(sizes),
            max_model_len=total,
            num_kv_tokens=max(sizes) * total + 64,  # two engines share the GPU
        )
        self.params = self.module("engine.sampling_params").SamplingParams(
            max_tokens=args.output_len, temperature=0.0, ignore_eos=True
        )
        self.output_len = args.output_len
        vocab = self.llm.engine.config.model_config.vocab_size
        for b in sizes:  # the same prompts on every side
            self.batches[b, args.input_len] = random_prompts(vocab, b, args.input_len)
            self.times[b, args.input_len] = []

    @property
    def device(self) -> torch.device:
        return self.llm.engine.runner.device

    def path(self, key) -> str:
        return "generate"

    def first_tokens(self, key) -> list[int]:
        return self._generate(key)[0].token_ids[:4]  # also the cell's warm-up

    def _generate(self, key):
        outputs = self.llm.generate(self.batches[key], self.params)
        check_full_length(outputs, self.output_len)
        return outputs

    def time_cell(self, key, repeat: int) -> float:
        sync(self.device)
        start = time.perf_counter()
        for _ in range(repeat):
            self._generate(key)
        sync(self.device)
        return (time.perf_counter() - start) * 1e3 / (repeat * self.output_len)


def run_compare(args: argparse.Namespace) -> int:
    sizes = int_list(args.batch_sizes, "--batch-sizes")
    contexts = int_list(args.contexts, "--contexts")
    if args.repeat is None:
        args.repeat = 2 if args.end_to_end else 100
    if args.rounds < 1 or args.repeat < 1:
        raise ValueError("--rounds and --repeat must be >= 1")
    if args.end_to_end and min(args.input_len, args.output_len) < 1:
        raise ValueError("--input-len and --output-len must be >= 1")
    baselines = [parse_baseline(text) for text in args.baseline]
    names = ["current", *(name for name, _ in baselines)]
    if len(set(names)) != len(names):
        raise ValueError(f"sides need distinct names, got {names}: use --baseline NAME=PATH")
    reference = args.reference or names[min(1, len(names) - 1)]
    if reference not in names:
        raise ValueError(f"--reference {reference!r} is not a side: {names}")
    with tempfile.TemporaryDirectory(prefix="tesela-compare-") as folder:
        kind = EndToEndSide if args.end_to_end else Side
        sides = [kind("current", PACKAGE)]
        for name, root in baselines:
            sides.append(kind(name, import_checkout(root, name, Path(folder)).__name__))
        results = compare(sides, args, sizes, contexts, reference)
    write_json(results, Path(args.output_dir), f"compare-{Path(args.model).name}")
    print(format_compare_table(results))
    return 0


def compare(sides: list[Side], args, sizes: list[int], contexts: list[int], reference: str) -> dict:
    for side in sides:
        side.build(args, sizes, contexts)
        for key in side.batches:
            side.tokens[key] = side.first_tokens(key)
    for _ in range(args.rounds):  # interleaved: a drift over time hits every side alike
        for side in sides:
            for key in side.batches:
                side.times[key].append(side.time_cell(key, args.repeat))
    base_side = next(side for side in sides if side.name == reference)
    rows = []
    for key in sides[0].batches:
        base = statistics.median(base_side.times[key])
        for side in sides:
            samples = side.times[key]
            rows.append(
                {
                    "side": side.name,
                    "path": side.path(key),
                    "batch": key[0],
                    "context": key[1],
                    "step_ms": statistics.median(samples),
                    "min_ms": min(samples),
                    "max_ms": max(samples),
                    "ratio": statistics.median(samples) / base,
                    "tokens": side.tokens[key],
                }
            )
    return {
        "model": args.model,
        "device": device_name(sides[0].device),
        "end_to_end": args.end_to_end,
        "sides": [side.name for side in sides],
        "reference": reference,
        "rounds": args.rounds,
        "repeat": args.repeat,
        "rows": rows,
    }


def format_compare_table(results: dict) -> str:
    if results.get("end_to_end"):
        what = f"LLM.generate, ms per output token step ({results['repeat']} generate calls"
        cell = "prompt tokens"
    else:
        what = (
            f"decode step (forward, LM head, argmax), ms per step ({results['repeat']} queued steps"
        )
        cell = "context"
    lines = [
        f"{what} a round), {results['model']} on {results['device']}: median of "
        f"{results['rounds']} interleaved rounds [min-max]; ratio to `{results['reference']}`",
        f"| side | forward | batch | {cell} | step ms | tok/s | ratio | first greedy tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['side']} | {row['path']} | {row['batch']} | {row['context']} | "
            f"{row['step_ms']:.4f} [{row['min_ms']:.4f}-{row['max_ms']:.4f}] | "
            f"{row['batch'] / row['step_ms'] * 1e3:,.0f} | {row['ratio']:.3f} | {row['tokens']} |"
        )
    return "\n".join(lines)
