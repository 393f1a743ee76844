"""The `tesela` command: generate | serve | bench | doctor.

The entry point on top of every layer. It imports torch (and the engine) only once a command
runs, so `tesela --help` answers at once; a subcommand's flags are built only when that
subcommand is named. A user's mistake (a missing folder, a bad flag value, a corrupt file)
prints one line and exits 2; `-v` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from tesela.engine_args import EngineArgs
from tesela.presets import PRESETS

USAGE_ERROR = 2
# Exceptions that mean "the input was wrong": their message says what and how to fix it.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults on every flag, and descriptions kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # EngineArgs writes its defaults into the help text already.
        if action.help and "(default:" in action.help:
            return action.help
        return super()._get_help_string(action)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="*", help="prompts (default: one example prompt)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=-1, help="-1: all tokens")
    parser.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    EngineArgs.add_cli_args(parser)


def cmd_generate(args: argparse.Namespace) -> int:
    from tesela import LLM, SamplingParams

    prompts = args.prompt or ["The capital of France is"]
    if any(not p for p in prompts):
        raise ValueError("a prompt is empty: give each prompt at least one character")
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
    )
    llm = LLM(EngineArgs.from_cli_args(args))
    if args.model in PRESETS:
        print(
            f"note: {args.model!r} is a preset with random weights: its text is noise",
            file=sys.stderr,
        )
    # A progress bar once the work is long enough to wonder whether it is still running.
    long_run = len(prompts) > 1 or args.max_tokens >= 256
    outputs = llm.generate(prompts, params, use_tqdm=long_run)
    for prompt, output in zip(prompts, outputs, strict=True):
        print(f"--- {prompt!r} -> ({len(output.token_ids)} tokens, {output.finish_reason})")
        print(output.text)
    stats = llm.engine.stats()["dispatch"]
    print(f"paths: {stats['paths']} fallbacks: {stats['fallbacks']}", file=sys.stderr)
    return 0


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--attention-backend", default="auto", help="auto | torch | triton")


def cmd_doctor(args: argparse.Namespace) -> int:
    from tesela.doctor import doctor_report

    device = args.device if args.device != "auto" else None
    print(doctor_report(device, attention_backend=args.attention_backend))
    return 0


def _lazy(module: str, add: str, run: str) -> Callable:
    """A builder that imports `module` (torch, the engine) only when its command is named."""

    def build(parser: argparse.ArgumentParser) -> Callable:
        loaded = importlib.import_module(module)
        getattr(loaded, add)(parser)
        return getattr(loaded, run)

    return build


def _simple(add: Callable, run: Callable) -> Callable:
    def build(parser: argparse.ArgumentParser) -> Callable:
        add(parser)
        return run

    return build


# name -> (help, builder); a builder adds the flags and returns the function to run.
COMMANDS: dict[str, tuple[str, Callable]] = {
    "generate": ("generate text offline", _simple(add_generate_arguments, cmd_generate)),
    "serve": (
        "OpenAI-compatible HTTP server (needs the server extra)",
        _lazy("tesela.server.app", "add_serve_arguments", "run_serve"),
    ),
    "doctor": (
        "the device, the backends found, and each decision",
        _simple(add_doctor_arguments, cmd_doctor),
    ),
}
BENCH_COMMANDS: dict[str, tuple[str, Callable]] = {
    "prefill": (
        "prefill latency by piecewise mode",
        _lazy("tesela.bench.prefill", "add_prefill_arguments", "run_prefill"),
    ),
    "decode": (
        "decode step through sampling: eager, graphs, HBM floor",
        _lazy("tesela.bench.decode", "add_decode_arguments", "run_decode"),
    ),
    "latency": (
        "offline generate: tokens/s per batch size",
        _lazy("tesela.bench.latency", "add_latency_arguments", "run_latency"),
    ),
    "serve": (
        "serving over HTTP: throughput, TTFT, ITL",
        _lazy("tesela.bench.serve", "add_bench_serve_arguments", "run_bench_serve"),
    ),
    "lora": (
        "LoRA adapters vs the base model: decode, prefill, graph memory",
        _lazy("tesela.bench.lora", "add_lora_arguments", "run_lora"),
    ),
    "compare": (
        "this checkout's decode step against other checkouts, in one process",
        _lazy("tesela.bench.compare", "add_compare_arguments", "run_compare"),
    ),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in `argv` gets its flags (None: all of them)."""
    parser = argparse.ArgumentParser(prog="tesela", description=__doc__, formatter_class=Formatter)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log more; tracebacks on errors"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    words = [a for a in argv if not a.startswith("-")] if argv is not None else None
    for name, (help_text, build) in COMMANDS.items():
        command = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=Formatter
        )
        if words is None or words[:1] == [name]:
            command.set_defaults(func=build(command))
    bench = sub.add_parser("bench", help="benchmarks (JSON + table; PNG with the plot extra)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, (help_text, build) in BENCH_COMMANDS.items():
        command = bench_sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=Formatter
        )
        if words is None or words[:2] == ["bench", name]:
            command.set_defaults(func=build(command))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args) or 0
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message} (-v shows the traceback)", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
