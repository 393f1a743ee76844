"""Tune the LoRA kernels' tiles on the GPU: `python3 -m tesela.tune.lora --model qwen3-0.6b`.

For each LoRA target of the model (qkv, o, gate_up and down at tensor-parallel size 1) and each
token bucket, times candidate tiles of the decode (`gather`: one fused launch) and extend
(`sgmv`: split-K shrink + expand) kernels inside a CUDA graph, as they run when served, with
`--num-adapters` adapters of rank 16 round robin over the rows (decode: one token per row;
extend: up to 32 rows splitting the bucket's tokens, as `tesela bench lora` prefills). Keeps
the fastest whose output matches the default tiles', and merges it into
tesela/lora/lora_tile_table.json (or `--output`; commit it). Decode tiles are one per target
shape (they fix a token's sum order, which must not depend on the batch: tesela/lora/tiles.py),
chosen by their mean time relative to the default over the buckets. `fused` times the GEMM
with the delta inside (tesela/lora/fused_gemm.py: at 1-64 tokens the one-launch kernel on
decode rows, above that the shrink and the TMA GEMM on extend rows) against what the layer runs
otherwise, the base linear (tesela/layers/gemv.py) followed by gather or sgmv, and keeps an
entry only for the buckets where it wins by FUSED_MARGIN (it drops a stale one where it no
longer does): the layer then runs it. One line per (style, target, bucket): default (fused:
the base linear + LoRA kernels) and best time. The table is written after every line, so a run
cut short keeps what it measured; `--styles` and `--buckets` split the work.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from tesela.lora import tiles as lora_tiles
from tesela.lora.fused_gemm import (
    BLOCK_K,
    FUSED,
    SMALL_MAX_TOKENS,
    FusedTiles,
    lora_gemm,
    small_block_m,
)
from tesela.lora.kernels import GATHER, SGMV, triton_lora
from tesela.lora.state import LoRABuffers
from tesela.lora.tiles import LoRATiles

RANK = 16
BUCKETS = {
    GATHER: "1,8,32,128",
    SGMV: "16,128,1024,4096",
    FUSED: "1,2,4,8,16,32,64,128,256,512,1024,2048,4096",
}
FUSED_MARGIN = 0.97  # a fused entry is kept only this much faster than the layer's other path
L2_BYTES = 96 << 20  # weights in copies over this many bytes are read cold (H100/H200 L2: 50 MB)


def target_shapes(model_config) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (input width, slice sizes) of the model's LoRA targets."""
    hidden, inter = model_config.hidden_size, model_config.intermediate_size
    q, kv = model_config.q_size, model_config.kv_size
    return {
        "qkv_proj": (hidden, (q, kv, kv)),
        "o_proj": (q, (hidden,)),
        "gate_up_proj": (hidden, (inter, inter)),
        "down_proj": (inter, (hidden,)),
    }


def gather_candidates(default: LoRATiles) -> list[LoRATiles]:
    """Column tiles, programs to aim for (columns per program), warps and K chunks in flight;
    never the K step (the sum order)."""
    grid = itertools.product((128, 256, 512), (96, 192, 384, 1 << 20), (4, 8), (2, 4))
    return [default] + [
        replace(default, block_n=n, expand_programs=p, num_warps=w, max_unroll=u)
        for n, p, w, u in grid
    ]


def sgmv_candidates(default: LoRATiles, stage: int, best=None) -> list[LoRATiles]:
    """Stage 0: the token block and the shrink's warps; stage 1: the expand's column tiles,
    warps, programs and the pipeline depth, around the best of stage 0. Never the K step or
    the splits (the sum order), nor token blocks past 32 (tl.dot would take other MMA
    instructions)."""
    if stage == 1:
        grid = itertools.product((64, 128, 256), (2, 3, 4), (4, 8), (256, 512, 1024))
        return [
            replace(best, block_n=n, num_stages=s, expand_warps=w, expand_programs=p)
            for n, s, w, p in grid
        ]
    grid = itertools.product((16, 32), (2, 4, 8))
    return [default] + [replace(default, block_m=m, num_warps=w) for m, w in grid]


def fused_candidates(num_tokens: int) -> list[FusedTiles]:
    """Token and column tiles, warps and pipeline depth; never the K step (the sum order).
    Up to SMALL_MAX_TOKENS, the one-launch kernel's column tiles, warps and depth."""
    if num_tokens <= SMALL_MAX_TOKENS:  # and K split over 2-4 programs per column tile
        grid = ((16, 4, 4, 1), (32, 4, 3, 1), (32, 4, 4, 1), (32, 4, 6, 1), (64, 4, 3, 1),
                (64, 4, 4, 1), (64, 8, 3, 1), (128, 8, 3, 1), (128, 4, 3, 1), (16, 4, 4, 2),
                (16, 4, 4, 4), (32, 4, 4, 2), (32, 4, 4, 4), (64, 4, 4, 2), (64, 4, 4, 4),
                (32, 4, 6, 2), (128, 4, 3, 4))  # fmt: skip
        block_m = small_block_m(num_tokens)  # what the kernel takes (the entry records it)
        return [
            FusedTiles(block_m, n, BLOCK_K, 1, w, s, small=True, split_k=k) for n, w, s, k in grid
        ]
    grid = ((128, 128, 8, 3), (128, 128, 4, 4), (128, 128, 8, 4), (64, 128, 4, 4),
            (128, 64, 4, 4), (64, 256, 4, 4), (128, 256, 8, 3), (64, 64, 4, 4))  # fmt: skip
    return [FusedTiles(m, n, BLOCK_K, 8, w, s) for m, n, w, s in grid]


def segments_for(style: str, num_tokens: int, adapters: int) -> list[tuple[int, int, int]]:
    if style == GATHER:
        return [(t, t + 1, t % adapters) for t in range(num_tokens)]
    rows = min(32, num_tokens)
    bounds = [num_tokens * r // rows for r in range(rows + 1)]
    return [(bounds[r], bounds[r + 1], r % adapters) for r in range(rows)]


class Case:
    """One (style, target shape, token count) with its inputs on the GPU. The adapters' weights
    come in copies that together overflow L2 (`spread_weights`), each launch of a timed run
    reading the next copy: served, a layer's LoRA weights were evicted by the other layers'
    GEMMs, while x and y were just written (warm)."""

    def __init__(self, style, in_features, sizes, num_tokens, adapters, dtype, device="cuda"):
        g = torch.Generator().manual_seed(num_tokens)
        slices, out = len(sizes), sum(sizes)
        self.sizes = tuple(sizes)
        a = torch.randn(adapters, slices, RANK, in_features, generator=g) * in_features**-0.5
        b = torch.randn(adapters, out, RANK, generator=g) * 0.05
        self.a, self.b = a.to(device, dtype), b.to(device, dtype)
        self.x = torch.randn(num_tokens, in_features, generator=g).to(device, dtype)
        self.y0 = torch.randn(num_tokens, out, generator=g).to(device, dtype)
        offsets = [0, *itertools.accumulate(sizes)]
        self.offsets = torch.tensor(offsets, dtype=torch.int32, device=device)
        self.max_size, self.style = max(sizes), style
        self.buffers = LoRABuffers.allocate(num_tokens, adapters, device)
        self.buffers.write(segments_for(style, num_tokens, adapters), num_tokens)
        self.buffers.ranks.fill_(RANK)
        self.buffers.scalings.fill_(2.0)
        self.weights = [(self.a, self.b)]

    def spread_weights(self, l2_bytes: int = L2_BYTES) -> None:
        copies = min(256, -(-l2_bytes // (self.a.nbytes + self.b.nbytes)))
        self.weights = [(self.a.clone(), self.b.clone()) for _ in range(copies)]

    def run(self, y, tiles, a=None, b=None):
        a, b = (self.a, self.b) if a is None else (a, b)
        triton_lora(self.x, y, a, b, self.offsets, self.max_size, self.buffers, self.style, tiles)

    def run_all(self, y, tiles):
        for a, b in self.weights:
            self.run(y, tiles, a, b)

    def output(self, tiles) -> torch.Tensor:
        y = self.y0.clone()
        self.run(y, tiles)
        return y

    def time_us(self, tiles, expected) -> float:
        """Microseconds per launch set in a CUDA graph; inf if it fails or disagrees."""
        import triton.testing

        try:
            got = self.output(tiles)
            if not torch.allclose(got.float(), expected.float(), atol=6e-2, rtol=2e-2):
                return float("inf")
            y = self.y0.clone()
            ms = triton.testing.do_bench_cudagraph(lambda: self.run_all(y, tiles), rep=20)
            return 1e3 * ms / len(self.weights)
        except Exception:  # noqa: BLE001  (a config that does not compile or fit shared memory)
            return float("inf")


def tune_fused(case: Case) -> tuple[float, float, FusedTiles | None]:
    """(base GEMM + LoRA kernels us, best fused us, its tiles; None where none is faster by
    the margin) of one token bucket. The unfused side is what the layer runs instead: the base
    linear (tesela/layers/gemv.py: its Triton GEMV where tuned at decode sizes, else cuBLAS),
    then the case's LoRA kernels (decode sizes: gather; else sgmv). The base weight also comes
    in copies that overflow L2, cycled with the adapters': served, it was evicted too."""
    import triton.testing

    from tesela.layers import gemv

    k, out = case.x.shape[1], sum(case.sizes)
    weight = (torch.randn(out, k, device=case.x.device) * k**-0.5).to(case.x.dtype)
    weights = [weight] + [weight.clone() for _ in range(-(-L2_BYTES // weight.nbytes))]

    def unfused(a, b, w=weight):
        y = gemv.linear(case.x, w, None)
        triton_lora(case.x, y, a, b, case.offsets, case.max_size, case.buffers, case.style)
        return y

    def fused(tiles, a, b, w=weight):
        return lora_gemm(case.x, w, None, a, b, case.sizes, case.buffers, tiles)

    def time_us(run) -> float:
        runs = [(a, b, weights[i % len(weights)]) for i, (a, b) in enumerate(case.weights)]
        ms = triton.testing.do_bench_cudagraph(lambda: [run(*r) for r in runs], rep=20)
        return 1e3 * ms / len(runs)

    expected = unfused(case.a, case.b).float()
    base, best = time_us(unfused), (float("inf"), None)
    for tiles in fused_candidates(case.x.shape[0]):
        if not tiles.fits(case.sizes):
            continue
        try:
            got = fused(tiles, case.a, case.b).float()
            if not torch.allclose(got, expected, atol=6e-2, rtol=2e-2):
                continue
            timed = (time_us(lambda a, b, w, t=tiles: fused(t, a, b, w)), tiles)
            best = min(best, timed, key=lambda t: t[0])
        except Exception:  # noqa: BLE001  (a config that does not compile or fit shared memory)
            continue
    return base, best[0], best[1] if best[0] < base * FUSED_MARGIN else None


def tune_sgmv(case: Case, default: LoRATiles) -> tuple[float, float, LoRATiles]:
    """(default us, best us, best tiles) of one token bucket."""
    expected = case.output(default)
    best = _fastest(case, sgmv_candidates(default, 0), expected)
    stage_1 = _fastest(case, sgmv_candidates(default, 1, best[1]), expected)
    best = min(best, stage_1, key=lambda t: t[0])
    return case.time_us(default, expected), best[0], best[1]


def tune_gather(cases: list[Case], default: LoRATiles) -> tuple[float, float, LoRATiles]:
    """One tile for every token count (it fixes the sum order): the candidate with the least
    total time over the buckets, relative to the default's in each (so batch 1 counts as much
    as batch 128). Returns (1.0, its relative time, it)."""
    expected = [case.output(default) for case in cases]
    base = [case.time_us(default, e) for case, e in zip(cases, expected, strict=True)]

    def relative(tiles: LoRATiles) -> float:
        times = [c.time_us(tiles, e) for c, e in zip(cases, expected, strict=True)]
        return sum(t / b for t, b in zip(times, base, strict=True)) / len(cases)

    timed = [(relative(tiles), tiles) for tiles in gather_candidates(default)]
    best = min(timed, key=lambda t: t[0])
    return 1.0, best[0], best[1]


def tune_shape(style: str, in_features: int, sizes, buckets: list[int], adapters: int) -> dict:
    """bucket -> (default, best, best tiles) of one target (gather: the one bucket "all")."""
    dtype, n = torch.bfloat16, max(sizes)
    probe = torch.empty(0, device="cuda", dtype=dtype)

    def kernels(m: int) -> str:  # fused: timed against the base GEMM + what the layer runs
        return GATHER if style == GATHER or (style == FUSED and m <= SMALL_MAX_TOKENS) else SGMV

    cases = [Case(kernels(m), in_features, sizes, m, adapters, dtype) for m in buckets]
    for case in cases:
        case.spread_weights()
    if style == FUSED:
        return {str(m): tune_fused(c) for m, c in zip(buckets, cases, strict=True)}
    tiles = [
        lora_tiles.choose_tiles(style, m, in_features, n, len(sizes), 16, probe) for m in buckets
    ]
    if style == GATHER:
        return {lora_tiles.ALL_TOKENS: tune_gather(cases, tiles[0])}
    return {str(m): tune_sgmv(c, t) for m, c, t in zip(buckets, cases, tiles, strict=True)}


def _fastest(case: Case, candidates: list[LoRATiles], expected) -> tuple[float, LoRATiles]:
    timed = [(case.time_us(tiles, expected), tiles) for tiles in candidates]
    return min(timed, key=lambda t: t[0])


def main(argv: list[str] | None = None) -> int:
    from tesela.config import ModelConfig
    from tesela.presets import PRESETS

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen3-0.6b", help="a preset name")
    parser.add_argument(
        "--styles", default="gather,sgmv,fused",
        help="gather (decode), sgmv (extend), fused (extend: the delta inside the base GEMM)",
    )  # fmt: skip
    parser.add_argument("--buckets", default=None, help="token buckets (default per style)")
    parser.add_argument("--num-adapters", type=int, default=4)
    parser.add_argument(
        "--output", default=str(lora_tiles.TABLE_PATH),
        help="the table to merge into (default: the checked-in one the kernels read)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    device_name = torch.cuda.get_device_name()
    path = Path(args.output)
    source = path if path.exists() else lora_tiles.TABLE_PATH
    table = json.loads(source.read_text()) if source.exists() else {}
    shapes = target_shapes(ModelConfig.from_hf_dict(PRESETS[args.model]))
    entry = table.setdefault(device_name, {}).setdefault("bfloat16", {})
    for style in args.styles.split(","):
        buckets = [int(b) for b in (args.buckets or BUCKETS[style]).split(",")]
        for name, (k, sizes) in shapes.items():
            key = lora_tiles.shape_key(k, max(sizes), len(sizes))
            results = tune_shape(style, k, sizes, buckets, args.num_adapters)
            for bucket, (base, best_time, best) in results.items():
                unit = "x the default" if style == GATHER else "us"
                kept = asdict(best) if best is not None else None
                print(f"{style} {name} {key} tokens={bucket}: default {base:.2f}, best "
                      f"{best_time:.2f} {unit} {kept}", flush=True)  # fmt: skip
                shape_entries = entry.setdefault(style, {}).setdefault(key, {})
                if kept is None:  # fused: base GEMM + sgmv stays (a stale entry goes)
                    shape_entries.pop(bucket, None)
                else:
                    shape_entries[bucket] = kept
            path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
