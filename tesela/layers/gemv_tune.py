"""Fill tesela/layers/gemv_table.json on this GPU: for every linear shape of the given models and
every M bucket, time cuBLAS and each candidate Triton config, and keep the Triton config only
where it is correct (within one bf16 step of F.linear) and faster by `--margin`.

    python -m tesela.layers.gemv_tune --models qwen3-0.6b,llama-3.2-1b

Timing replays a CUDA graph of many calls, as the decode graph runs them, each call on its own
copy of the weight so that the copies together overflow L2 (in a decode step no weight is in
L2 when its layer starts).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from tesela.config import ModelConfig
from tesela.layers import gemv
from tesela.presets import PRESETS

L2_OVERFLOW_BYTES = 256 * 2**20


def linear_shapes(preset: str) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of each linear layer of a preset model."""
    mc = ModelConfig.from_hf_dict(PRESETS[preset])
    h, q, kv = mc.hidden_size, mc.q_size, mc.kv_size
    return {
        "qkv_proj": (q + 2 * kv, h),
        "o_proj": (h, q),
        "gate_up_proj": (2 * mc.intermediate_size, h),
        "down_proj": (h, mc.intermediate_size),
        "lm_head": (mc.vocab_size, h),
    }


def candidates(bucket: int) -> list[dict]:
    """Configs worth timing at this M bucket: the FMA path for 1-2 tokens (no padding of M),
    tensor cores from 4 up; tiles kept to what the registers hold."""
    configs = []
    for block_n in (4, 8, 16):
        for block_k in (256, 512, 1024):
            if bucket * block_n * block_k <= 8192:
                configs.append(dict(block_n=block_n, block_k=block_k, use_dot=False))
    if bucket >= 4:
        for block_n in (16, 32, 64):
            for block_k in (128, 256):
                configs.append(dict(block_n=block_n, block_k=block_k, use_dot=True))
    return [dict(c, num_warps=4, num_stages=4) for c in configs]


def time_calls(fn, weights: list[torch.Tensor], repeat: int = 5) -> float:
    """Microseconds per call of fn(weight), replayed from a CUDA graph over all the copies."""
    for w in weights[:2]:
        fn(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(w)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeat):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / len(weights))
    return sorted(samples)[len(samples) // 2]


def tune_shape(n: int, k: int, margin: float, dtype: torch.dtype) -> tuple[dict, list[dict]]:
    """{bucket: config} where Triton wins, and a report row per bucket."""
    nbytes = n * k * dtype.itemsize
    copies = max(2, math.ceil(L2_OVERFLOW_BYTES / nbytes))
    weights = [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5 for _ in range(copies)]
    chosen, report = {}, []
    for bucket in gemv.M_BUCKETS:
        x = torch.randn(bucket, k, device="cuda", dtype=dtype)
        reference = F.linear(x, weights[0])
        cublas_us = time_calls(lambda w, x=x: F.linear(x, w), weights)
        best = None
        for config in candidates(bucket):
            got = gemv.gemv(x, weights[0], None, config)
            if not torch.allclose(got.float(), reference.float(), rtol=8e-3, atol=1e-2):
                print(f"  {n}x{k} M={bucket} {config}: wrong result, skipped")
                continue
            us = time_calls(lambda w, x=x, c=config: gemv.gemv(x, w, None, c), weights)
            if best is None or us < best[0]:
                best = (us, config)
        row = {"n": n, "k": k, "m": bucket, "cublas_us": cublas_us}
        if best is not None:
            row.update(triton_us=best[0], config=best[1])
            if best[0] * (1 + margin) < cublas_us:
                chosen[str(bucket)] = best[1]
        row["choice"] = "triton" if str(bucket) in chosen else "cublas"
        row["gbs"] = nbytes / min(cublas_us, row.get("triton_us", math.inf)) / 1e3
        report.append(row)
        print(
            f"  {n}x{k} M={bucket}: cublas {cublas_us:.2f} us, triton "
            f"{row.get('triton_us', math.nan):.2f} us -> {row['choice']} ({row['gbs']:.0f} GB/s)"
        )
    del weights
    torch.cuda.empty_cache()
    return chosen, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="qwen3-0.6b,llama-3.2-1b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--margin", type=float, default=0.03, help="Triton must win by this")
    parser.add_argument("--output", default=str(gemv.TABLE_PATH))
    parser.add_argument("--report", default=None, help="also write the timings (JSON) here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gemv_tune times kernels on a CUDA GPU: run it on one")
    dtype = getattr(torch, args.dtype)
    shapes = {shape for m in args.models.split(",") for shape in linear_shapes(m).values()}
    output = Path(args.output)
    table = json.loads(output.read_text()) if output.is_file() else {}
    device = torch.cuda.get_device_name()
    entries = table.setdefault(device, {}).setdefault(args.dtype, {})
    report = []
    for n, k in sorted(shapes):
        chosen, rows = tune_shape(n, k, args.margin, dtype)
        report += rows
        entries.pop(f"{n},{k}", None)
        if chosen:
            entries[f"{n},{k}"] = chosen
    output.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    if args.report:
        Path(args.report).write_text(json.dumps({"device": device, "rows": report}, indent=1))
    print(f"wrote {output}: {sum(len(v) for v in entries.values())} Triton entries on {device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
