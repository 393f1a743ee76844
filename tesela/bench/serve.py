"""`tesela bench serve`: a load generator for the OpenAI-compatible server, over loopback.

A fixed-seed mix of prompt and output lengths is sent as streaming /v1/completions requests,
either at fixed concurrencies (closed loop: a new request as soon as one finishes) or at
Poisson request rates (open loop). Prompts are token ids and `ignore_eos` is set, so every
length is exact with any tokenizer. Reports request and token throughput, time to first token
(TTFT), inter-token latency (ITL, the gaps between streamed chunks) and time per output token
(TPOT) percentiles; writes JSON + PNG and prints a table last.

Without --url the benchmark starts a server of its own, in a subprocess (or, with
--in-process, on a thread of this process: quicker, but the load generator then shares the GIL
with the server and inflates its latencies). Either way the server's engine runs in an
engine-core process of its own, as under `tesela serve`; --engine-in-process puts it on a
thread of the server process instead, to compare the two.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tesela.bench.common import int_list, pyplot, save_figure, write_json
from tesela.bench.sse_client import sse_events
from tesela.engine_args import EngineArgs
from tesela.server.app import ServerThread, create_app, create_process_app

PROMPT_TOKEN_RANGE = 256  # ids below this are ordinary tokens in every supported vocabulary


def add_bench_serve_arguments(parser: argparse.ArgumentParser) -> None:
    EngineArgs.add_cli_args(parser)  # used only when the benchmark starts the server itself
    parser.add_argument(
        "--url", default=None, help="an already running server (default: start one in this process)"
    )
    parser.add_argument(
        "--concurrency",
        default=None,
        help="comma-separated concurrencies (closed loop); default 1,8,32 "
        "unless --request-rate is given",
    )
    parser.add_argument(
        "--request-rate",
        default=None,
        help="comma-separated request rates in req/s (Poisson arrivals); "
        "'inf' sends everything at once",
    )
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per setting")
    parser.add_argument(
        "--input-len",
        default="32,128,512",
        help="prompt lengths in tokens, drawn uniformly per request",
    )
    parser.add_argument(
        "--output-len",
        default="32,128",
        help="output lengths in tokens, drawn uniformly per request",
    )
    parser.add_argument(
        "--max-queue-len", type=int, default=1024, help="the started server's --max-queue-len"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the server on a thread of this process instead of a subprocess (quicker to "
        "start, but the load generator then shares the GIL with it)",
    )
    parser.add_argument(
        "--engine-in-process",
        action="store_true",
        help="the started server runs its engine on a thread of the server process instead of "
        "an engine-core process of its own (as `tesela serve --engine-in-process`)",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds before a request fails"
    )
    parser.add_argument("--output-dir", default="results", help="where JSON (and PNG) go")
    parser.add_argument(
        "--workload",
        default="random",
        choices=["random", "shared-prefix"],
        help="random: the prompt/output length mix below; shared-prefix: system prompts and "
        "conversation replays, with the prefix cache on and off (tesela/bench/serve_prefix.py)",
    )
    from tesela.bench.serve_prefix import add_shared_prefix_arguments

    add_shared_prefix_arguments(parser)
    # --seed (from the engine arguments) also fixes the workload and the arrival times.


@dataclass
class WorkItem:
    prompt: list[int]
    output_len: int


@dataclass
class RequestResult:
    ok: bool
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def _rate_list(text: str) -> list[float]:
    rates = [math.inf if v.strip() == "inf" else float(v) for v in text.split(",") if v.strip()]
    if not rates or min(rates) <= 0:
        raise ValueError(f"--request-rate needs positive rates (or 'inf'), got {text!r}")
    return rates


def make_workload(
    num_prompts: int, input_lens: list[int], output_lens: list[int], seed: int, max_model_len: int
) -> list[WorkItem]:
    rng = random.Random(seed)
    items = []
    for _ in range(num_prompts):
        input_len = min(rng.choice(input_lens), max_model_len - 2)
        output_len = min(rng.choice(output_lens), max_model_len - input_len)
        prompt = [rng.randrange(PROMPT_TOKEN_RANGE) for _ in range(input_len)]
        items.append(WorkItem(prompt, output_len))
    return items


# ---- one request, one setting -----------------------------------------------------------------


async def send_request(url: str, model: str, item: WorkItem, timeout: float) -> RequestResult:
    """One streaming completion; TTFT and ITL from the client's side (sse_client.py)."""
    body = {
        "model": model,
        "prompt": item.prompt,
        "max_tokens": item.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = RequestResult(ok=False)
    start = time.perf_counter()
    try:
        await asyncio.wait_for(_stream_into(result, url, body, start), timeout)
    except Exception as exc:  # a failed request is a data point, not the end of the run
        result.error = result.error or f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = time.perf_counter() - start
    result.ok = not result.error and result.output_tokens > 0
    return result


async def _stream_into(result: RequestResult, url: str, body: dict, start: float) -> None:
    last = start
    async for data in sse_events(url, "/v1/completions", body):
        if data == "[DONE]":
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            result.error = chunk["error"].get("message", "error")
            return
        now = time.perf_counter()
        if chunk.get("choices"):
            if result.ttft == 0.0:
                result.ttft = now - start
            else:
                result.itl.append(now - last)
            last = now
        if chunk.get("usage"):
            result.output_tokens = chunk["usage"]["completion_tokens"]


async def run_setting(
    url: str,
    model: str,
    items: list[WorkItem],
    *,
    concurrency: int | None,
    rate: float | None,
    seed: int,
    timeout: float,
) -> dict:
    semaphore = asyncio.Semaphore(concurrency or len(items))
    rng = random.Random(seed)

    async def limited(item: WorkItem) -> RequestResult:
        async with semaphore:
            return await send_request(url, model, item, timeout)

    start = time.perf_counter()
    tasks = []
    for item in items:
        tasks.append(asyncio.create_task(limited(item)))
        if rate is not None and not math.isinf(rate):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    summary = summarize(results, items, duration)
    return {"concurrency": concurrency, "request_rate": rate, **summary}


def _percentiles(values: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * scale

    return {
        "mean": statistics.fmean(ordered) * scale,
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
    }


def summarize(results: list[RequestResult], items: list[WorkItem], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(len(i.prompt) for r, i in zip(results, items, strict=True) if r.ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": _percentiles([r.ttft for r in ok]),
        "itl_ms": _percentiles([gap for r in ok for gap in r.itl]),
        "tpot_ms": _percentiles(tpot),
        "e2e_ms": _percentiles([r.e2e for r in ok]),
    }


# ---- the command ------------------------------------------------------------------------------


def run_bench_serve(args: argparse.Namespace) -> int:
    if args.workload == "shared-prefix":
        from tesela.bench.serve_prefix import run_shared_prefix

        return run_shared_prefix(args, _start_server)
    try:
        input_lens = int_list(args.input_len, "--input-len")
        output_lens = int_list(args.output_len, "--output-len")
        rates = _rate_list(args.request_rate) if args.request_rate else []
        concurrency_text = args.concurrency or ("" if rates else "1,8,32")
        concurrencies = int_list(concurrency_text, "--concurrency") if concurrency_text else []
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        import httpx  # noqa: F401
    except ImportError:
        print("error: the serving benchmark needs httpx: pip install httpx", file=sys.stderr)
        return 2
    server = None if args.url else _start_server(args)
    url = (args.url or server.url).rstrip("/")
    try:
        results = asyncio.run(_run_all(url, args, input_lens, output_lens, concurrencies, rates))
    finally:
        if server is not None:
            server.stop()
    name = "serve-" + Path(results["model"].rstrip("/")).name
    write_outputs(results, Path(args.output_dir), name)
    print(format_table(results))
    return 0


def _start_server(args: argparse.Namespace):
    """A server of its own: a subprocess by default, so that the load generator does not
    compete with the server for one interpreter's GIL; a thread with --in-process."""
    engine_args = EngineArgs.from_cli_args(args)
    options = (engine_args, args.max_queue_len, args.engine_in_process)
    if args.in_process:
        return _ServerInThread(*options)
    return _ServerProcess(*options)


class _ServerInThread:
    def __init__(self, engine_args: EngineArgs, max_queue_len: int, engine_in_process: bool):
        self.server = ServerThread(_make_app(engine_args, max_queue_len, engine_in_process))
        self.url = self.server.start(timeout=900)

    def stop(self) -> None:
        self.server.stop()


class _ServerProcess:
    def __init__(self, engine_args: EngineArgs, max_queue_len: int, engine_in_process: bool):
        import multiprocessing

        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        context = multiprocessing.get_context("spawn")  # never fork a process that holds CUDA
        # Not a daemon: its engine runs in a process of its own (see stop()).
        self.process = context.Process(
            target=_serve_forever, args=(engine_args, max_queue_len, engine_in_process, port)
        )
        self.process.start()
        self._wait_ready(timeout=900)  # loading and graph capture can take minutes on a GPU

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.is_alive():
                raise RuntimeError(f"the benchmark server exited (code {self.process.exitcode})")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the benchmark server was not ready within {timeout} s")

    def stop(self) -> None:
        # SIGTERM: uvicorn shuts down, and its lifespan stops the engine process.
        self.process.terminate()
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def _make_app(engine_args: EngineArgs, max_queue_len: int, engine_in_process: bool):
    if not engine_in_process:
        return create_process_app(engine_args, max_queue_len=max_queue_len)
    from tesela.engine.llm_engine import LLMEngine, make_engine_config

    config, path = make_engine_config(engine_args)
    return create_app(LLMEngine(config, path), max_queue_len=max_queue_len)


def _serve_forever(engine_args, max_queue_len: int, engine_in_process: bool, port: int) -> None:
    import uvicorn

    app = _make_app(engine_args, max_queue_len, engine_in_process)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _run_all(url, args, input_lens, output_lens, concurrencies, rates) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=60) as http:
        card = (await http.get(url + "/v1/models")).raise_for_status().json()["data"][0]
    model, max_model_len = card["id"], card.get("max_model_len", 2048)
    items = make_workload(args.num_prompts, input_lens, output_lens, args.seed, max_model_len)
    warmup = make_workload(2, input_lens[:1], [4], args.seed + 1, max_model_len)
    await run_setting(
        url, model, warmup, concurrency=2, rate=None, seed=args.seed, timeout=args.request_timeout
    )
    runs = []
    settings = [(c, None) for c in concurrencies] + [(None, r) for r in rates]
    for concurrency, rate in settings:
        run = await run_setting(
            url,
            model,
            items,
            concurrency=concurrency,
            rate=rate,
            seed=args.seed,
            timeout=args.request_timeout,
        )
        runs.append(run)
        print(
            f"  {_setting_label(run)}: {run['output_throughput']:.1f} output tok/s, "
            f"{run['failed']} failed",
            file=sys.stderr,
        )
    return {
        "model": model,
        "url": url,
        "num_prompts": args.num_prompts,
        "seed": args.seed,
        "input_lens": input_lens,
        "output_lens": output_lens,
        "mean_input_len": statistics.fmean(len(i.prompt) for i in items),
        "mean_output_len": statistics.fmean(i.output_len for i in items),
        "runs": [_json_safe(r) for r in runs],
    }


def _json_safe(run: dict) -> dict:
    rate = run["request_rate"]
    return {**run, "request_rate": "inf" if rate is not None and math.isinf(rate) else rate}


def _setting_label(run: dict) -> str:
    if run["concurrency"] is not None:
        return f"concurrency {run['concurrency']}"
    return f"rate {run['request_rate']} req/s"


def write_outputs(results: dict, output_dir: Path, name: str) -> None:
    plt = pyplot(write_json(results, output_dir, name))
    if plt is None:
        return
    runs = results["runs"]
    labels = [_setting_label(r).replace("concurrency ", "c=").replace("rate ", "") for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.bar(labels, [r["output_throughput"] for r in runs])
    left.set(ylabel="output tokens/s", title="throughput")
    for key, style in (("ttft_ms", "o-"), ("itl_ms", "s--")):
        for q in ("p50", "p99"):
            right.plot(labels, [r[key][q] for r in runs], style, label=f"{key[:-3]} {q}")
    right.set(ylabel="ms", yscale="log", title="latency")
    right.legend(fontsize=8)
    fig.suptitle(f"tesela serve: {results['model']}")
    save_figure(fig, output_dir, name)


def format_table(results: dict) -> str:
    lines = [
        f"serve {results['model']}: {results['num_prompts']} requests per setting, mean input "
        f"{results['mean_input_len']:.0f} / output {results['mean_output_len']:.0f} tokens",
        "| concurrency | rate (req/s) | req/s | output tok/s | TTFT p50 / p99 ms "
        "| ITL p50 / p99 ms | TPOT p50 ms | failed |",
        "|---" * 8 + "|",
    ]
    for run in results["runs"]:
        concurrency = run["concurrency"] if run["concurrency"] is not None else "-"
        rate = run["request_rate"] if run["request_rate"] is not None else "-"
        ttft, itl = run["ttft_ms"], run["itl_ms"]
        lines.append(
            f"| {concurrency} | {rate} | {run['request_throughput']:.2f} | "
            f"{run['output_throughput']:.1f} | {ttft['p50']:.1f} / {ttft['p99']:.1f} | "
            f"{itl['p50']:.2f} / {itl['p99']:.2f} | {run['tpot_ms']['p50']:.2f} | "
            f"{run['failed']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tesela bench serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_bench_serve_arguments(parser)
    return run_bench_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
