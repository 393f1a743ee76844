"""Fill tesela/layers/gemv_table.json on this GPU: for every small-M call of the given models'
decode step (each linear layer, and the norm + qkv/gate_up and silu + down pairs) and every M
bucket, time the unfused path (cuBLAS, plus the separate norm or activation kernel) and each
candidate Triton config; keep a config only where it is correct (within one bf16 step of the
unfused path) and faster by `--margin`.

    python -m tesela.tune.gemv --models qwen3-0.6b,llama-3.2-1b
    python -m tesela.tune.gemv --models llama-3-8b --tensor-parallel-size 1,2   # TP shards
    python -m tesela.tune.gemv --models qwen3-0.6b --prologues norm   # only the norm pairs

(The table is rewritten after every case, so a run of one prologue keeps every other entry.)

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
from tesela.core.intmath import next_power_of_2
from tesela.distributed.sharding import Section, check_tp_shapes, padded_vocab
from tesela.layers import fused, gemv
from tesela.presets import PRESETS

L2_OVERFLOW_BYTES = 256 * 2**20


def tuned_cases(preset: str, tensor_parallel_size: int = 1) -> list[tuple[str, int, int]]:
    """(prologue, N, K) of each small-M call a decode step of a preset model makes on one rank
    of `tensor_parallel_size` (the shard shapes of tesela/distributed/sharding.py: qkv and
    gate_up split their rows, o and down their columns, the LM head its padded vocabulary).
    An MoE model adds its router GEMM, and has dense MLP shapes only if some layer is dense
    (its experts run the fused MoE kernels, tuned by tesela/tune/moe.py)."""
    mc = ModelConfig.from_hf_dict(PRESETS[preset])
    size = tensor_parallel_size
    check_tp_shapes(
        num_attention_heads=mc.num_attention_heads,
        num_key_value_heads=mc.num_key_value_heads,
        intermediate_size=mc.intermediate_size,
        tensor_parallel_size=size,
    )
    h, q = mc.hidden_size, mc.q_size // size
    kv = Section(mc.num_key_value_heads, mc.head_dim).rank_rows(0, size)[1]
    inter = mc.intermediate_size // size
    vocab = padded_vocab(mc.vocab_size, size) // size
    plain = [(q + 2 * kv, h), (h, q), (vocab, h)]
    # (At TP > 1 the qkv norm prologue serves only the first layer: the other norms take
    # partial sums, reduced together with the add and norm before the GEMM.)
    cases = [("none", n, k) for n, k in plain] + [("norm", q + 2 * kv, h)]
    if mc.moe is not None:  # the router GEMM (replicated on every rank) before the experts
        cases.append(("none", mc.moe.num_experts, h))
    if any(not mc.is_moe_layer(i) for i in range(mc.num_hidden_layers)):  # dense MLPs
        cases += [("none", 2 * inter, h), ("none", h, inter), ("silu", h, inter)]
        if size == 1:
            cases.append(("norm", 2 * inter, h))
    return cases


def candidates(bucket: int, k: int, prologue: str = "none") -> list[dict]:
    """Configs worth timing at this M bucket: the streaming kernel's FMA path for 1-2 tokens (no
    padding of M), tensor cores from 4 up, tiles kept to what the registers hold; and for a
    plain GEMM the split kernel's tiles. (The split kernel has no prologue: with one, it lost to
    the separate kernel + its plain GEMM at every M = 1-2 shape of qwen3-0.6b and llama-3.2-1b
    on H200, and a llama-3.2-1b SiLU + down entry that nearly tied made the decode step 0.8%
    slower.)

    At 1-2 tokens the tiles also include the whole of K in one tile (K up to 8192, rounded up
    to a power of two): the kernel loads its first weight tile before the PDL wait, so such a
    program streams all its weights while the previous kernel of the step finishes."""
    configs = []
    for block_n in (4, 8, 16):
        for block_k in (256, 512, 1024):
            if bucket * block_n * block_k <= 8192:
                configs.append(dict(block_n=block_n, block_k=block_k, use_dot=False))
    whole_k = next_power_of_2(k)
    if bucket <= 2 and 1024 < whole_k <= 8192:
        for block_n in (2, 4, 8):
            if bucket * block_n * whole_k <= 16384:
                configs.append(dict(block_n=block_n, block_k=whole_k, use_dot=False))
    if bucket >= 4:
        for block_n in (16, 32, 64):
            for block_k in (128, 256):
                configs.append(dict(block_n=block_n, block_k=block_k, use_dot=True))
    # 8 warps keep twice the loads in flight per program: at batch 1 they won by 1.5x on the
    # MoE expert GEMVs (H200), so every tile is timed with both.
    configs = [dict(c, num_warps=w, num_stages=4) for c in configs for w in (4, 8)]
    return configs + (split_candidates(k) if prologue == "none" else [])


def split_candidates(k: int) -> list[dict]:
    """The split kernel's tiles (plain GEMMs; tensor cores at every bucket, M padded to 16):
    Triton keeps num_stages - 1 weight tiles in flight per program; K goes over 1-8 programs
    where it divides into whole tiles."""
    return [
        dict(block_n=n, block_k=bk, use_dot=True, split_k=split, num_warps=4, num_stages=stages)
        for n in (32, 64, 128)
        for bk in (64, 128, 256)
        for split in (1, 2, 4, 8)
        for stages in (3, 5)
        if n * bk <= 16384 and k % (split * bk) == 0
    ]


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


class Case:
    """One (prologue, N, K, M) call: its inputs, the unfused path and the Triton kernel."""

    def __init__(self, prologue: str, bucket: int, k: int, dtype: torch.dtype) -> None:
        self.prologue = prologue
        width = 2 * k if prologue == "silu" else k
        self.x = torch.randn(bucket, width, device="cuda", dtype=dtype) * 2
        self.residual = torch.randn(bucket, k, device="cuda", dtype=dtype)
        self.norm_weight = torch.rand(k, device="cuda", dtype=dtype) + 0.5

    def unfused(self, weight: torch.Tensor, plain: dict | None) -> torch.Tensor:
        """What the model runs without this prologue's entry: separate kernel, then the
        plain choice (cuBLAS or the tuned plain kernel)."""
        x = self.x
        if self.prologue == "silu":
            x = fused.silu_and_mul(x)
        elif self.prologue == "norm":
            x = fused.rms_norm(x, self.norm_weight, 1e-6, self.residual)[0]
        return F.linear(x, weight) if plain is None else gemv.gemv(x, weight, None, plain)

    def triton(self, weight: torch.Tensor, config: dict) -> torch.Tensor:
        if self.prologue == "silu":
            return gemv.gemv_silu(self.x, weight, None, config)
        if self.prologue == "norm":
            residual, norm_weight = self.residual, self.norm_weight
            return gemv.gemv_norm(self.x, residual, norm_weight, 1e-6, weight, None, config)[0]
        return gemv.gemv(self.x, weight, None, config)


def keeps_triton(prologue: str, triton_us: float, unfused_us: float, margin: float) -> bool:
    """A plain GEMV must beat cuBLAS by `margin`. A fused prologue (norm, SiLU) is kept unless
    it loses by `margin`: the unfused path's extra launch and graph edge cost the decode step
    more than this back-to-back timing shows (H200, qwen3-30b-a3b: a re-tune that picked the
    separate norm + cuBLAS for qkv, 1% faster here, gave a table whose decode step was 10%
    slower, with 48 more launches)."""
    if prologue == "none":
        return triton_us * (1 + margin) < unfused_us
    return triton_us < unfused_us * (1 + margin)


def tune_case(prologue, n, k, margin, dtype, plain_choices, buckets) -> tuple[dict, list[dict]]:
    """{bucket: config} where Triton wins, and a report row per bucket timed."""
    nbytes = n * k * dtype.itemsize
    copies = max(2, math.ceil(L2_OVERFLOW_BYTES / nbytes))
    weights = [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5 for _ in range(copies)]
    chosen, report = {}, []
    for bucket in buckets:
        case = Case(prologue, bucket, k, dtype)
        plain = plain_choices.get((n, k, bucket)) if prologue != "none" else None
        reference = case.unfused(weights[0], None).float()
        baseline_us = time_calls(lambda w, c=case, p=plain: c.unfused(w, p), weights)
        best = None
        for config in candidates(bucket, k, prologue):
            got = case.triton(weights[0], config).float()
            if not torch.allclose(got, reference, rtol=8e-3, atol=1.5e-2):
                print(f"  {prologue} {n}x{k} M={bucket} {config}: wrong result, skipped")
                continue
            us = time_calls(lambda w, c=case, cfg=config: c.triton(w, cfg), weights)
            if best is None or us < best[0]:
                best = (us, config)
        row = {"prologue": prologue, "n": n, "k": k, "m": bucket, "unfused_us": baseline_us}
        if best is not None:
            row.update(triton_us=best[0], config=best[1])
            if keeps_triton(prologue, best[0], baseline_us, margin):
                chosen[str(bucket)] = best[1]
        row["choice"] = "triton" if str(bucket) in chosen else "unfused"
        row["weight_gbs"] = nbytes / min(baseline_us, row.get("triton_us", math.inf)) / 1e3
        report.append(row)
        print(
            f"  {prologue} {n}x{k} M={bucket}: unfused {baseline_us:.2f} us, triton "
            f"{row.get('triton_us', math.nan):.2f} us -> {row['choice']} "
            f"({row['weight_gbs']:.0f} GB/s)"
        )
    del weights
    torch.cuda.empty_cache()
    return chosen, report


def merged_entries(previous: dict, chosen: dict, buckets: tuple[int, ...]) -> dict:
    """A shape's {bucket: config} after timing `buckets`: this run's choices for them (a timed
    bucket that Triton lost drops its old entry), the previous entries for every other."""
    return {b: c for b, c in previous.items() if int(b) not in buckets} | chosen


def table_plain_choices(entries: dict) -> dict[tuple[int, int, int], dict]:
    """{(N, K, bucket): config} of the plain Triton entries of one device and dtype's table
    (`entries`: prologue -> "N,K" -> bucket -> config): what the model runs for a prologue's
    GEMM when that prologue has no entry."""
    return {
        (*(int(v) for v in shape.split(",")), int(bucket)): config
        for shape, buckets in entries.get("none", {}).items()
        for bucket, config in buckets.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="qwen3-0.6b,llama-3.2-1b")
    parser.add_argument(
        "--tensor-parallel-size",
        default="1",
        help="comma-separated sizes whose per-rank shard shapes to tune (e.g. 1,2)",
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--prologues",
        default=",".join(gemv.PROLOGUES),
        help="tune only the cases with these prologues (comma-separated: none, silu, norm)",
    )
    parser.add_argument(
        "--buckets",
        default=",".join(str(b) for b in gemv.M_BUCKETS),
        help="time only these M buckets (comma-separated); the table keeps its other entries",
    )
    parser.add_argument("--margin", type=float, default=0.03, help="Triton must win by this")
    parser.add_argument("--output", default=str(gemv.TABLE_PATH))
    parser.add_argument("--report", default=None, help="also write the timings (JSON) here")
    args = parser.parse_args(argv)
    prologues = set(args.prologues.split(","))
    unknown = prologues - set(gemv.PROLOGUES)
    if unknown:
        parser.error(f"--prologues: unknown {sorted(unknown)} (expected {gemv.PROLOGUES})")
    parts = args.buckets.split(",")
    if not all(v.strip().isdigit() and int(v) in gemv.M_BUCKETS for v in parts):
        parser.error(f"--buckets: {args.buckets!r} (comma-separated, each one of {gemv.M_BUCKETS})")
    buckets = tuple(sorted({int(v) for v in parts}))
    if not torch.cuda.is_available():
        raise SystemExit("tesela.tune.gemv times kernels on a CUDA GPU: run it on one")
    dtype = getattr(torch, args.dtype)
    sizes = [int(v) for v in args.tensor_parallel_size.split(",")]
    cases = {
        case
        for m in args.models.split(",")
        for size in sizes
        for case in tuned_cases(m, size)
        if case[0] in prologues
    }
    output = Path(args.output)
    table = json.loads(output.read_text()) if output.is_file() else {}
    device = torch.cuda.get_device_name()
    entries = table.setdefault(device, {}).setdefault(args.dtype, {})
    report = []
    # A prologue's baseline is its separate kernel + the plain choice: the table's, or (plain
    # shapes run first) this run's.
    plain_choices = table_plain_choices(entries)
    for prologue, n, k in sorted(cases, key=lambda c: (c[0] != "none", c)):
        chosen, rows = tune_case(prologue, n, k, args.margin, dtype, plain_choices, buckets)
        report += rows
        shapes = entries.setdefault(prologue, {})
        chosen = merged_entries(shapes.pop(f"{n},{k}", {}), chosen, buckets)
        if prologue == "none":
            for bucket in gemv.M_BUCKETS:
                plain_choices.pop((n, k, bucket), None)
            plain_choices.update({(n, k, int(b)): config for b, config in chosen.items()})
        if chosen:
            shapes[f"{n},{k}"] = chosen
        # after every case: a run stopped midway keeps what it measured
        output.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    if args.report:
        Path(args.report).write_text(json.dumps({"device": device, "rows": report}, indent=1))
    count = sum(len(b) for shapes in entries.values() for b in shapes.values())
    print(f"wrote {output}: {count} Triton entries on {device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
