"""The `tesela` command: generate | serve | bench | doctor."""

from __future__ import annotations

import argparse
import logging
import sys

from tesela.presets import DEFAULT_MODEL, PRESETS


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a model folder or a preset ({', '.join(PRESETS)}); "
        f"default: {DEFAULT_MODEL}, a random model",
    )
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="token budget of one step (the chunked-prefill size)",
    )
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--num-kv-tokens", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument(
        "--prefill-graph",
        default=None,
        choices=["breakable", "compiled", "none"],
        help="piecewise graph strategy (default: breakable on CUDA, none on CPU)",
    )
    parser.add_argument("--piece-compiler", default="eager", choices=["eager", "inductor"])
    parser.add_argument(
        "--capture-sizes",
        default=None,
        help="comma-separated token counts to capture (default: the ladder)",
    )
    parser.add_argument("--max-capture-tokens", type=int, default=None)
    parser.add_argument("--disable-cuda-graph", action="store_true")
    parser.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="share the KV of repeated prompt prefixes across requests (default: on)",
    )
    parser.add_argument(
        "--overlap-schedule",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="schedule step N+1 while the GPU runs step N (default: on for CUDA, off on CPU)",
    )
    parser.add_argument(
        "--verify-graphs",
        action="store_true",
        help="compare every captured size with eager at startup",
    )


def engine_kwargs(args: argparse.Namespace) -> dict:
    sizes = [int(s) for s in args.capture_sizes.split(",")] if args.capture_sizes else None
    return dict(
        load_format=args.load_format,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        attention_backend=args.attention_backend,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        num_kv_tokens=args.num_kv_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        prefill_graph=args.prefill_graph,
        piece_compiler=args.piece_compiler,
        capture_sizes=sizes,
        max_capture_tokens=args.max_capture_tokens,
        disable_cuda_graph=args.disable_cuda_graph,
        verify_graphs=args.verify_graphs,
        enable_prefix_caching=args.enable_prefix_caching,
        overlap_schedule=args.overlap_schedule,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from tesela import LLM, SamplingParams

    prompts = args.prompt or ["The capital of France is"]
    if args.model in PRESETS:
        print(
            f"note: {args.model!r} is a preset with random weights: its text is noise",
            file=sys.stderr,
        )
    llm = LLM(args.model, **engine_kwargs(args))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
    )
    outputs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    for prompt, output in zip(prompts, outputs, strict=True):
        print(f"--- {prompt!r} -> ({len(output.token_ids)} tokens, {output.finish_reason})")
        print(output.text)
    stats = llm.engine.stats()["dispatch"]
    print(f"paths: {stats['paths']} fallbacks: {stats['fallbacks']}", file=sys.stderr)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from tesela.doctor import doctor_report

    print(
        doctor_report(
            args.device if args.device != "auto" else None, attention_backend=args.attention_backend
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tesela", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text offline")
    gen.add_argument("prompt", nargs="*", help="prompts (default: one example prompt)")
    add_engine_arguments(gen)
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)

    doctor = sub.add_parser("doctor", help="the device, the backends found, and each decision")
    doctor.add_argument("--device", default="auto")
    doctor.add_argument("--attention-backend", default="auto")
    doctor.set_defaults(func=cmd_doctor)

    bench = sub.add_parser("bench", help="benchmarks (JSON + PNG + table)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from tesela.bench import add_prefill_arguments, run_prefill

    prefill = bench_sub.add_parser("prefill", help="prefill latency by graph strategy")
    add_prefill_arguments(prefill)
    prefill.set_defaults(func=run_prefill)
    from tesela.bench_decode import add_decode_arguments, run_decode

    decode = bench_sub.add_parser(
        "decode", help="decode step through sampling: eager, graphs, HBM floor"
    )
    add_decode_arguments(decode)
    decode.set_defaults(func=run_decode)
    from tesela.bench_latency import add_latency_arguments, run_latency

    latency = bench_sub.add_parser("latency", help="offline generate: tokens/s per batch size")
    add_latency_arguments(latency)
    latency.set_defaults(func=run_latency)
    from tesela.bench_serve import add_bench_serve_arguments, run_bench_serve

    serve_bench = bench_sub.add_parser("serve", help="serving over HTTP: throughput, TTFT, ITL")
    add_bench_serve_arguments(serve_bench)
    serve_bench.set_defaults(func=run_bench_serve)
    _add_optional_commands(sub, bench_sub)
    return parser


def _add_optional_commands(sub, bench_sub) -> None:
    """Commands whose modules are optional pieces (server, decode bench)."""
    try:
        from tesela.server.app import add_serve_arguments, run_serve
    except ImportError:
        return
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
