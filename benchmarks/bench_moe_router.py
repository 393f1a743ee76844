"""The MoE router at decode: the fused router GEMM + top-k (`tesela::moe_router`, one launch)
against the gate Linear (`gemv.linear`) + `tesela::moe_topk` (two launches).

Each side runs as a CUDA graph of `--layers` routers back to back, each with its own gate
weight (by default more than L2 holds, so each arrives cold, as between two MoE blocks of a
decode step), timed with CUDA events; the figure is the
median device time per router over `--repeat` replays. Beside it: how many tokens got exactly
the same experts on both sides (logits may differ by one bf16 step: another fp32 summation
order). GPU only.

python benchmarks/bench_moe_router.py                      # qwen3-30b-a3b: E=128, H=2048, top-8
python benchmarks/bench_moe_router.py --experts 8 --hidden 4096 --top-k 2 --scoring topk_softmax
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from tesela.bench.common import (
    add_output_argument,
    device_name,
    int_list,
    pyplot,
    save_figure,
    write_json,
)
from tesela.layers import gemv
from tesela.layers.moe import router


def graph_us_per_call(calls, repeat: int) -> float:
    """Median device microseconds per call of a CUDA graph holding `calls` (warmed up first)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeat + 3):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(samples[3:])


def measure(args, num_tokens: int) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(num_tokens)
    x = torch.randn(num_tokens, args.hidden, generator=generator, device="cuda").bfloat16()
    gates = [
        (
            torch.randn(args.experts, args.hidden, generator=generator, device="cuda") * 0.03
        ).bfloat16()
        for _ in range(args.layers)
    ]
    rule = (args.top_k, args.scoring, True)

    def unfused(w):
        return router.fused_select_experts(gemv.linear(x, w, None), *rule)

    fused_ids = [router.fused_router(x, w, *rule)[1] for w in gates]
    unfused_ids = [unfused(w)[1] for w in gates]
    same = sum(int((a == b).all(dim=1).sum()) for a, b in zip(fused_ids, unfused_ids, strict=True))
    return {
        "num_tokens": num_tokens,
        "unfused_us": graph_us_per_call([lambda w=w: unfused(w) for w in gates], args.repeat),
        "fused_us": graph_us_per_call(
            [lambda w=w: router.fused_router(x, w, *rule) for w in gates], args.repeat
        ),
        "same_experts": same / (num_tokens * args.layers),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--scoring", default="softmax_topk", choices=router.SCORINGS)
    parser.add_argument("--num-tokens", default="1,2,4,8,16,32,64")
    # 256 gates (128 MB for qwen3-30b-a3b) overflow L2, as the rest of a decode step does
    # between two MoE blocks; 48 (one step's count) stay in L2 and time the router hot.
    parser.add_argument("--layers", type=int, default=256, help="routers per graph replay")
    parser.add_argument("--repeat", type=int, default=50)
    add_output_argument(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_moe_router needs a CUDA GPU", file=sys.stderr)
        return 1
    router.allocate_workspace("cuda")
    rows = [measure(args, n) for n in int_list(args.num_tokens, "--num-tokens")]
    results = {"device": device_name(torch.device("cuda")), "config": vars(args), "rows": rows,
               "router_gemm_config": router.ROUTER_GEMM_CONFIG}  # fmt: skip
    name = f"moe_router_e{args.experts}_h{args.hidden}"
    path = write_json(results, Path(args.output_dir), name)
    plt = pyplot(path)
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        tokens = [r["num_tokens"] for r in rows]
        ax.plot(tokens, [r["unfused_us"] for r in rows], "o-", label="gemv.linear + moe_topk")
        ax.plot(tokens, [r["fused_us"] for r in rows], "o-", label="moe_router (one launch)")
        ax.set(xscale="log", xlabel="tokens", ylabel="us per router (in a graph)",
               title=f"{results['device']}: E={args.experts} H={args.hidden}")  # fmt: skip
        ax.legend()
        save_figure(fig, Path(args.output_dir), name)
    print(f"{results['device']}  E={args.experts} H={args.hidden} top-{args.top_k}")
    print("tokens  unfused_us  fused_us  speedup  same_experts")
    for r in rows:
        print(f"{r['num_tokens']:6d}  {r['unfused_us']:10.2f}  {r['fused_us']:8.2f}  "
              f"{r['unfused_us'] / r['fused_us']:7.2f}  {r['same_experts']:12.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
