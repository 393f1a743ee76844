"""`tesela bench latency`: end-to-end offline generation, tokens/s per batch size.

Random prompts of `--input-len` tokens, greedy, exactly `--output-len` new tokens each (EOS
ignored), through `LLM.generate`: scheduling, prefill, every decode step, sampling and
detokenization, as a user of the offline engine sees them. One warm-up run per batch size
first (graph capture and Triton compilation stay out of the figure). JSON + table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tesela.bench.common import (
    add_model_arguments,
    add_output_argument,
    device_name,
    int_list,
    sync,
    write_json,
)
from tesela.engine_args import EngineArgs


def add_latency_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--batch-sizes", default="1,32,256", help="prompts generated together")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="new tokens per prompt")
    parser.add_argument(
        "--num-kv-tokens", type=int, default=None, help="KV cache size (default: the engine's)"
    )
    parser.add_argument("--disable-cudagraph", action="store_true", help="run every batch eagerly")
    add_output_argument(parser, "the JSON")
    EngineArgs.add_cli_args(parser, only=("overlap_schedule",))  # the engine's own flag
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="> 0: seeded random sampling (top-k 50)"
    )


def run_latency(args: argparse.Namespace) -> int:
    from tesela.engine.llm import LLM

    batch_sizes = int_list(args.batch_sizes, "--batch-sizes")
    llm = LLM(
        args.model,
        dtype=args.dtype,
        device=args.device,
        attention_backend=args.attention_backend,
        max_num_seqs=max(batch_sizes),
        max_model_len=args.input_len + args.output_len + 16,
        num_kv_tokens=args.num_kv_tokens,
        disable_cudagraph=args.disable_cudagraph,
        overlap_schedule=args.overlap_schedule,
    )
    config = llm.engine.config
    results = {
        "model": args.model,
        "device": device_name(llm.engine.runner.device),
        "dtype": config.dtype,
        "attention_backend": config.attention_backend,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "decode_graphs": config.graph.full_decode and config.device != "cpu",
        "overlap_schedule": config.overlap_schedule,
        "temperature": args.temperature,
        "rows": [
            measure(llm, b, args.input_len, args.output_len, args.temperature) for b in batch_sizes
        ],
    }
    write_json(results, Path(args.output_dir), f"latency-{args.model}")
    print(format_latency_table(results))
    return 0


def measure(
    llm, batch_size: int, input_len: int, output_len: int, temperature: float = 0.0
) -> dict:
    from tesela.engine.sampling_params import SamplingParams

    prompts = random_prompts(llm.engine.config.model_config.vocab_size, batch_size, input_len)
    params = SamplingParams(
        max_tokens=output_len,
        temperature=temperature,
        top_k=50 if temperature > 0 else -1,
        seed=0 if temperature > 0 else None,
        ignore_eos=True,
    )
    device = llm.engine.runner.device
    llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    sync(device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    sync(device)
    seconds = time.perf_counter() - start
    check_full_length(outputs, output_len)
    return {
        "batch": batch_size,
        "seconds": seconds,
        "output_tokens_per_s": batch_size * output_len / seconds,
        "total_tokens_per_s": batch_size * (input_len + output_len) / seconds,
        "ms_per_step": seconds / output_len * 1e3,
    }


def random_prompts(vocab: int, batch_size: int, input_len: int) -> list[list[int]]:
    """`batch_size` prompts of `input_len` random token ids, the same for a batch size
    whichever tree or run draws them."""
    generator = torch.Generator().manual_seed(batch_size)
    return torch.randint(0, vocab, (batch_size, input_len), generator=generator).tolist()


def check_full_length(outputs, output_len: int) -> None:
    if any(len(o.token_ids) != output_len for o in outputs):
        raise RuntimeError("a request stopped early: the figure would not be comparable")


def format_latency_table(results: dict) -> str:
    lines = [
        f"offline generate {results['model']} ({results['dtype']}, attention "
        f"{results['attention_backend']}, decode graphs {'on' if results['decode_graphs'] else 'off'}, "
        f"overlap {'on' if results.get('overlap_schedule') else 'off'}) "
        f"on {results['device']}: {results['input_len']} prompt tokens, "
        f"{results['output_len']} output tokens per request, temperature "
        f"{results.get('temperature', 0.0)}",
        "| batch | seconds | output tok/s | total tok/s | ms per step |",
        "|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['batch']} | {row['seconds']:.3f} | {row['output_tokens_per_s']:,.0f} | "
            f"{row['total_tokens_per_s']:,.0f} | {row['ms_per_step']:.2f} |"
        )
    return "\n".join(lines)
