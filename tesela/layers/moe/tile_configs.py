"""Tile sizes for the fused MoE kernels, per (E, N, K) shape and token-count bucket.

`tile_configs.json` maps "E,N,K" (N: output features of the GEMM, K: its input features; the
gated gate/up GEMM is keyed by its 2*I rows) to {M bucket: config}. The buckets are powers of
two; a batch of M tokens uses the config of its own bucket (the largest power of two <= M),
or `default_config` where that bucket was not tuned. `python -m tesela.tune.moe` times
candidates on the GPU and writes the file; shapes missing from it use `default_config`.

A config names its path: "gemv" (the decode path: one program per (token, expert) pair for
gate/up, one per token summing its k pairs for down) or "grouped" (sorted blocks, the prefill
path), with the tile sizes that path reads. The H200 tune of qwen3-30b-a3b's down GEMM
("128,2048,768", buckets 1 and 16) was dropped when the down GEMV became the kernel that sums
the top-k (its tiles, timed per pair, would be [8, 16, 256] per program now: register spills);
`python -m tesela.tune.moe --model qwen3-30b-a3b --buckets 1,16` re-times it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

CONFIG_FILE = Path(__file__).with_name("tile_configs.json")
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Up to this many tokens the per-pair GEMV reads each routed expert's weights once per pair,
# which at decode batch sizes is what the grouped GEMM reads too, without the sort.
GEMV_MAX_TOKENS = 8


def shape_key(num_experts: int, n: int, k: int) -> str:
    return f"{num_experts},{n},{k}"


def m_bucket(num_tokens: int) -> int:
    return max([b for b in M_BUCKETS if b <= max(num_tokens, 1)])


def default_config(num_tokens: int, gemm: str = "gate_up") -> dict[str, Any]:
    """`gemm`: "gate_up" or "down" (their GEMV kernels want different tiles)."""
    if num_tokens <= GEMV_MAX_TOKENS:
        if gemm == "down":
            # Its program holds all k pairs' tiles and its grid has M rows, not M*k: narrow N
            # tiles give it enough programs (at M=1, H=2048: 512 of [8, 4, 256], 61 registers
            # a thread on sm_90 with no spills; 16 KB of loads in flight each).
            return {"path": "gemv", "BLOCK_N": 4, "BLOCK_K": 256, "num_warps": 8,
                    "num_stages": 2}  # fmt: skip
        return {"path": "gemv", "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2}
    block_m = 16 if num_tokens <= 64 else 64
    return {
        "path": "grouped",
        "BLOCK_M": block_m,
        "BLOCK_N": 64,
        "BLOCK_K": 64,
        "GROUP_M": 8,
        "num_warps": 4,
        "num_stages": 3,
    }


@functools.cache
def _table(path: Path = CONFIG_FILE) -> dict[str, dict[str, dict[str, Any]]]:
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def get_config(
    num_experts: int,
    n: int,
    k: int,
    num_tokens: int,
    table: dict | None = None,
    gemm: str = "gate_up",
) -> dict[str, Any]:
    """The tuned config for this shape and token count (from `table`, by default the JSON
    file), else the default for `gemm` ("gate_up" or "down")."""
    by_bucket = (_table() if table is None else table).get(shape_key(num_experts, n, k), {})
    # Only the token count's own bucket: a config tuned for 16 tokens (a GEMV, say) must not
    # serve a 4096-token prefill because the buckets between were never tuned.
    config = by_bucket.get(str(m_bucket(num_tokens)))
    return dict(config) if config else default_config(num_tokens, gemm)
