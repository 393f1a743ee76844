"""`tesela bench serve --workload shared-prefix`: the prefix cache on and off, in one run.

Two workloads of repeated prefixes, each sent to a server with prefix caching on and then to a
fresh server with it off (same model, same flags, each in its own process, each starting
cold):

  system-prompts  `--num-system-prompts` random system prompts of `--system-prompt-len` tokens;
                  `--num-prompts` requests, each a random system prompt plus a user turn of
                  `--user-len` tokens, sent closed-loop at `--concurrency` (the first value;
                  default 32). The issue's shape: 8 x 2,000 tokens, `--num-prompts 256`.
  conversations   `--num-conversations` recorded conversations of `--num-turns` turns replayed
                  concurrently, each turn sent when the previous one finished: turn k's prompt
                  is a system prompt, the earlier user turns and the recorded assistant replies
                  (fixed tokens, as a replay of a logged chat), and the new user turn.

Output lengths come from `--output-len` (with `ignore_eos`), like the random workload. The
table gives TTFT, output throughput and the prefix-cache hit rate per workload and setting,
then the on/off ratios. Everything is random token ids with a fixed seed (`--seed`).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tesela.bench.common import int_list, pyplot, save_figure, write_json
from tesela.bench.serve import (
    PROMPT_TOKEN_RANGE,
    RequestResult,
    WorkItem,
    run_setting,
    send_request,
    summarize,
)


def add_shared_prefix_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("shared-prefix workload (--workload shared-prefix)")
    group.add_argument(
        "--num-system-prompts", type=int, default=8, help="distinct shared system prompts"
    )
    group.add_argument(
        "--system-prompt-len", type=int, default=2000, help="tokens per system prompt"
    )
    group.add_argument(
        "--user-len", default="64,128,192", help="user-turn lengths, drawn uniformly"
    )
    group.add_argument(
        "--num-conversations", type=int, default=32, help="conversations replayed turn by turn"
    )
    group.add_argument("--num-turns", type=int, default=4, help="turns per conversation")


@dataclass
class Conversation:
    turns: list[WorkItem]  # turn k's full prompt and output length


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(PROMPT_TOKEN_RANGE) for _ in range(n)]


def system_prompt_workload(args, system_prompts, user_lens, output_lens) -> list[WorkItem]:
    rng = random.Random(args.seed + 11)
    return [
        WorkItem(rng.choice(system_prompts) + _tokens(rng, rng.choice(user_lens)), out)
        for out in (rng.choice(output_lens) for _ in range(args.num_prompts))
    ]


def conversation_workload(args, system_prompts, user_lens, output_lens) -> list[Conversation]:
    rng = random.Random(args.seed + 23)
    conversations = []
    for _ in range(args.num_conversations):
        history = list(rng.choice(system_prompts))
        turns = []
        for _ in range(args.num_turns):
            history += _tokens(rng, rng.choice(user_lens))
            output_len = rng.choice(output_lens)
            turns.append(WorkItem(list(history), output_len))
            history += _tokens(rng, output_len)  # the recorded assistant reply
        conversations.append(Conversation(turns))
    return conversations


async def replay_conversations(url, model, conversations, timeout) -> dict:
    async def replay(conversation: Conversation) -> list[RequestResult]:
        return [await send_request(url, model, item, timeout) for item in conversation.turns]

    start = time.perf_counter()
    per_conversation = await asyncio.gather(*(replay(c) for c in conversations))
    duration = time.perf_counter() - start
    results = [r for rs in per_conversation for r in rs]
    items = [item for c in conversations for item in c.turns]
    return summarize(results, items, duration)


async def _cache_stats(url: str) -> tuple[int, int]:
    import httpx

    async with httpx.AsyncClient(timeout=60) as http:
        stats = (await http.get(url + "/stats")).raise_for_status().json()
    return stats.get("prefix_cache_hit_tokens", 0), stats.get("prefix_cache_queried_tokens", 0)


async def _measure(url: str, run) -> dict:
    """Run one workload; add the hit rate of its own requests (from the server's counters)."""
    hits_before, queried_before = await _cache_stats(url)
    summary = await run
    hits, queried = await _cache_stats(url)
    queried -= queried_before
    summary["hit_rate"] = (hits - hits_before) / queried if queried else 0.0
    return summary


async def run_workloads(url: str, args, workloads) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=60) as http:
        model = (await http.get(url + "/v1/models")).raise_for_status().json()["data"][0]["id"]
    items, conversations, concurrency = workloads
    # Warm up with prompts that share nothing with the workload (graphs, allocator, kernels).
    warm_rng = random.Random(args.seed + 99)
    warmup = [WorkItem(_tokens(warm_rng, 64), 4) for _ in range(2)]
    await run_setting(url, model, warmup, concurrency=2, rate=None, seed=0, timeout=60)
    system = await _measure(
        url,
        run_setting(
            url,
            model,
            items,
            concurrency=concurrency,
            rate=None,
            seed=args.seed,
            timeout=args.request_timeout,
        ),
    )
    replay = await _measure(
        url, replay_conversations(url, model, conversations, args.request_timeout)
    )
    return {"model": model, "system-prompts": system, "conversations": replay}


def run_shared_prefix(args, start_server) -> int:
    """Both workloads against a cache-on server, then against a cache-off one."""
    try:
        user_lens = int_list(args.user_len, "--user-len")
        output_lens = int_list(args.output_len, "--output-len")
        concurrency = int_list(args.concurrency or "32", "--concurrency")[0]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.url:
        print("error: --workload shared-prefix starts its own servers (no --url)", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    system_prompts = [_tokens(rng, args.system_prompt_len) for _ in range(args.num_system_prompts)]
    items = system_prompt_workload(args, system_prompts, user_lens, output_lens)
    conversations = conversation_workload(args, system_prompts, user_lens, output_lens)
    results = {"settings": _settings(args, concurrency, items, conversations), "runs": {}}
    for label, enabled in (("cache on", True), ("cache off", False)):
        args.enable_prefix_caching = enabled
        print(f"  starting a server with prefix caching {label[6:]}", file=sys.stderr)
        server = start_server(args)
        try:
            run = asyncio.run(run_workloads(server.url, args, (items, conversations, concurrency)))
        finally:
            server.stop()
        results["model"] = run.pop("model")
        results["runs"][label] = run
    name = "serve-prefix-" + Path(results["model"].rstrip("/")).name
    write_prefix_outputs(results, Path(args.output_dir), name)
    print(format_prefix_table(results))
    return 0


def _settings(args, concurrency, items, conversations) -> dict:
    turns = [t for c in conversations for t in c.turns]
    return {
        "seed": args.seed,
        "concurrency": concurrency,
        "num_system_prompts": args.num_system_prompts,
        "system_prompt_len": args.system_prompt_len,
        "num_prompts": len(items),
        "num_conversations": len(conversations),
        "num_turns": args.num_turns,
        "mean_prompt_len": statistics.fmean(len(i.prompt) for i in items),
        "mean_turn_prompt_len": statistics.fmean(len(t.prompt) for t in turns),
        "mean_output_len": statistics.fmean(i.output_len for i in items + turns),
    }


def ratios(results: dict, workload: str) -> tuple[float, float]:
    """(TTFT p50 off / on, output throughput on / off): above 1 means the cache helps."""
    on, off = results["runs"]["cache on"][workload], results["runs"]["cache off"][workload]
    ttft = off["ttft_ms"]["p50"] / on["ttft_ms"]["p50"] if on["ttft_ms"]["p50"] else 0.0
    throughput = (
        on["output_throughput"] / off["output_throughput"] if off["output_throughput"] else 0.0
    )
    return ttft, throughput


def format_prefix_table(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"shared-prefix serve {results['model']}: {s['num_system_prompts']} system prompts of "
        f"{s['system_prompt_len']} tokens; {s['num_prompts']} requests at concurrency "
        f"{s['concurrency']}; {s['num_conversations']} conversations x {s['num_turns']} turns",
        "| workload | prefix cache | TTFT p50 / p99 ms | output tok/s | req/s | hit rate "
        "| failed |",
        "|---" * 7 + "|",
    ]
    for workload in ("system-prompts", "conversations"):
        for label in ("cache on", "cache off"):
            run = results["runs"][label][workload]
            ttft = run["ttft_ms"]
            lines.append(
                f"| {workload} | {label[6:]} | {ttft['p50']:.1f} / {ttft['p99']:.1f} | "
                f"{run['output_throughput']:.1f} | {run['request_throughput']:.2f} | "
                f"{run['hit_rate']:.1%} | {run['failed']} |"
            )
    for workload in ("system-prompts", "conversations"):
        ttft, throughput = ratios(results, workload)
        lines.append(
            f"{workload}: TTFT p50 {ttft:.2f}x lower with the cache (target >= 3x), output "
            f"throughput {throughput:.2f}x higher (target >= 1.5x)"
        )
    return "\n".join(lines)


def write_prefix_outputs(results: dict, output_dir: Path, name: str) -> None:
    plt = pyplot(write_json(results, output_dir, name))
    if plt is None:
        return
    workloads = ("system-prompts", "conversations")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    for offset, label in ((-width / 2, "cache on"), (width / 2, "cache off")):
        runs = [results["runs"][label][w] for w in workloads]
        xs = [i + offset for i in range(len(workloads))]
        left.bar(xs, [r["ttft_ms"]["p50"] for r in runs], width, label=label)
        right.bar(xs, [r["output_throughput"] for r in runs], width, label=label)
    left.set(ylabel="TTFT p50 (ms)", title="time to first token")
    right.set(ylabel="output tokens/s", title="output throughput")
    for axis in (left, right):
        axis.set_xticks(range(len(workloads)), workloads)
        axis.legend(fontsize=8)
    fig.suptitle(f"tesela prefix caching: {results['model']}")
    save_figure(fig, output_dir, name)
