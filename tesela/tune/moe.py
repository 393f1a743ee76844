"""Tune the fused MoE tile configs on the GPU: `python -m tesela.tune.moe --model NAME`.

For each GEMM shape of the model's MoE layers ((E, 2I, H) gate/up and (E, H, I) down) and each
token-count bucket, times every candidate config with the model's top-k routing on random
router logits and keeps the fastest; the result is merged into tile_configs.json (commit it).
Each GEMM is timed on its own, with the other at the default config, so the two are tuned
independently (the intermediate layout is the same for both paths). A "gemv" candidate for the
down GEMM is timed as it runs: `down_sum_gemv_kernel`, one program per (token, N tile) summing
the token's k pairs, so its grid has M (not M*k) rows and narrow N tiles matter more.
Timing replays a CUDA graph of the routings, as the decode graph runs the layer: timed from the
host (one Python call per routing) the launch overhead hid the tiles' differences, and the
tuner kept 4-warp gate/up tiles 1.5x slower on H200 than the 8-warp ones.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from tesela.layers.moe import tile_configs
from tesela.layers.moe.fused_moe import fused_experts
from tesela.layers.moe.router import select_experts
from tesela.tune.gemv import time_calls

# GEMV tiles (BLOCK_N, BLOCK_K, num_warps): the down kernel holds k tiles per program, so it
# gets narrower and shorter ones.
GEMV_TILES = {
    # gate/up at batch 1 streams k experts' [2I, H] weights through (k * 2I / BLOCK_N)
    # programs: narrow tiles give the loads enough programs in flight.
    "gate_up": list(itertools.product((4, 8, 16, 32), (128, 256, 512), (2, 4, 8))),
    "down": list(itertools.product((2, 4, 8, 16), (64, 128, 256), (4, 8))),
}


ROUTINGS = 8


def candidates(num_tokens: int, gemm: str) -> list[dict]:
    configs = []
    if num_tokens <= 32:
        for block_n, block_k, warps in GEMV_TILES[gemm]:
            configs.append({"path": "gemv", "BLOCK_N": block_n, "BLOCK_K": block_k,
                            "num_warps": warps, "num_stages": 2})  # fmt: skip
    for block_m, block_n, block_k, stages, warps in itertools.product(
        (16, 32, 64, 128), (64, 128), (64, 128), (3, 4), (4, 8)
    ):
        if block_m > 4 * max(num_tokens, 16):
            continue
        configs.append({"path": "grouped", "BLOCK_M": block_m, "BLOCK_N": block_n,
                        "BLOCK_K": block_k, "GROUP_M": 8, "num_warps": warps,
                        "num_stages": stages})  # fmt: skip
    return configs


def time_config(inputs, configs) -> float:
    """Microseconds per routing, replayed from a CUDA graph over all the routings: timed from
    the host, a call's Python launch overhead would hide the kernels' differences."""
    x, w13, w2, routings = inputs

    def run(routing) -> None:
        fused_experts(x, w13, w2, *routing, configs=configs)

    try:
        return time_calls(run, routings)
    except Exception:  # noqa: BLE001  (a config that does not compile or fit shared memory)
        torch.cuda.synchronize()
        return float("inf")


def make_routings(num_experts, top_k, num_tokens, device) -> list[tuple]:
    """Routings timed one after another in one graph. Each reads its experts cold, as a decode
    step's layer does: while a routing's pairs fit in E, the routings take disjoint experts in
    turn (E // (M * k) of them, every expert once), so no expert is served from L2 by an
    earlier routing; larger batches touch most experts anyway, and get ROUTINGS random ones."""
    pairs = num_tokens * top_k
    routings = []
    if pairs <= num_experts:
        order = torch.randperm(num_experts, device=device)
        for start in range(0, num_experts - pairs + 1, pairs):
            ids = order[start : start + pairs].view(num_tokens, top_k)
            weights = torch.softmax(torch.randn(num_tokens, top_k, device=device), dim=-1)
            routings.append((weights.to(torch.bfloat16), ids))
        return routings
    for _ in range(ROUTINGS):
        logits = torch.randn(num_tokens, num_experts, device=device)
        routings.append(select_experts(logits, top_k, "softmax_topk", True))
    return routings


def tune_shape(num_experts, hidden, intermediate, top_k, num_tokens, dtype) -> tuple[dict, dict]:
    """The fastest (gate/up, down) configs for one token count."""
    device = torch.device("cuda")
    w13 = torch.randn(num_experts, 2 * intermediate, hidden, device=device, dtype=dtype) * 0.02
    w2 = torch.randn(num_experts, hidden, intermediate, device=device, dtype=dtype) * 0.02
    x = torch.randn(num_tokens, hidden, device=device, dtype=dtype)
    inputs = (x, w13, w2, make_routings(num_experts, top_k, num_tokens, device))
    defaults = {gemm: tile_configs.default_config(num_tokens, gemm) for gemm in GEMV_TILES}
    best = []
    for gemm in ("gate_up", "down"):
        timed = []
        for config in candidates(num_tokens, gemm):
            pair = (
                (config, defaults["down"]) if gemm == "gate_up" else (defaults["gate_up"], config)
            )
            timed.append((time_config(inputs, pair), config))
        best.append(min(timed, key=lambda t: t[0])[1])
    return best[0], best[1]


def main(argv: list[str] | None = None) -> int:
    from tesela.config import ModelConfig
    from tesela.presets import PRESETS

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen3-30b-a3b", help="a preset name")
    parser.add_argument("--buckets", default=",".join(map(str, tile_configs.M_BUCKETS)))
    args = parser.parse_args(argv)
    moe = ModelConfig.from_hf_dict(PRESETS[args.model]).moe
    hidden = PRESETS[args.model]["hidden_size"]
    if moe is None:
        raise SystemExit(f"{args.model} is not a mixture-of-experts model")
    table = json.loads(tile_configs.CONFIG_FILE.read_text())
    e, i = moe.num_experts, moe.intermediate_size
    up_key, down_key = (
        tile_configs.shape_key(e, 2 * i, hidden),
        tile_configs.shape_key(e, hidden, i),
    )
    for m in (int(b) for b in args.buckets.split(",")):
        up, down = tune_shape(e, hidden, i, moe.top_k, m, torch.bfloat16)
        table.setdefault(up_key, {})[str(m)] = up
        table.setdefault(down_key, {})[str(m)] = down
        print(f"M={m}: gate/up {up}  down {down}", flush=True)
        tile_configs.CONFIG_FILE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
