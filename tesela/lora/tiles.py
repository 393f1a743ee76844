"""The tiles of the LoRA kernels (tesela/lora/kernels.py): sane Hopper defaults, and a table of
measured ones.

A launch's tiles are a function of the padded token count, the target's shape (input width,
widest slice, slices), the adapter rank width, the device and the dtype, never of the batch: a
graph captured with them is right for every batch replayed at its size.

`lora_tile_table.json` beside this file maps device name -> dtype -> style -> "K,N,S" (input
width, widest slice, slices) -> token bucket (the smallest of TOKEN_BUCKETS >= the token count;
gather: "all", one entry per shape) -> tiles. It is written by `python3 -m tesela.tune.lora` on
the GPU and checked in; a count whose own bucket was not tuned, and any shape, device or dtype
not in it, gets the defaults below.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from tesela.core.intmath import next_power_of_2

SGMV, GATHER = "sgmv", "gather"
FUSED = "fused"  # extend: the shrink, then the base GEMM with the expand inside (fused_gemm.py)
TABLE_PATH = Path(__file__).with_name("lora_tile_table.json")
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
ALL_TOKENS = "all"  # the bucket of gather entries: one tile per shape (see LoRATiles)


def rank_block(max_lora_rank: int) -> int:
    """The rank width of the shrink output and of the kernels' rank tiles (tl.dot needs 16)."""
    return max(16, next_power_of_2(max_lora_rank))


def pow2_block(n: int, cap: int) -> int:
    return max(16, min(cap, next_power_of_2(n)))


def token_bucket(num_tokens: int) -> int | None:
    return next((b for b in TOKEN_BUCKETS if b >= num_tokens), None)


@dataclass(frozen=True)
class LoRATiles:
    """The tiles of one LoRA launch.

    A token's delta must be bit-identical whatever batch it is in, eager (its own token count)
    or replayed in a graph (a padded size). So what fixes the order in which its sums run
    depends on the target's shape alone, never on the token count or a tuned bucket: for
    `sgmv`, the K step and the split planes (`ORDER_FIELDS`; tl.dot adds a tile's products in
    K order whatever the token block, columns or warps); for `gather`, every field (its
    cross-thread sums follow the layout that columns and warps choose), so decode tiles are
    one per shape, tuned over all token counts at once."""

    ORDER_FIELDS: ClassVar[tuple[str, ...]] = ("block_k", "split_k")

    block_m: int  # sgmv: tokens per program (gather: one token per program)
    block_n: int  # output columns per expand (gather: fused) program
    block_k: int  # input features per shrink step (gather: per unrolled chunk)
    split_k: int  # sgmv: shrink programs per (token block, slice), over disjoint K ranges
    num_warps: int = 4  # gather: the fused kernel; sgmv: the shrink
    num_stages: int = 3
    max_unroll: int = 4  # gather: K chunks whose loads are in flight together
    expand_warps: int = 8  # sgmv: the expand (a 32 x 128 tile of y needs ~250 registers at 4)
    expand_programs: int = 512  # sgmv's expand, gather: programs to aim for (`expand_columns`)

    def k_per_split(self, in_features: int) -> int:
        """Each split's share of K, whole BLOCK_K steps (the last split takes what is left)."""
        steps = -(-in_features // self.block_k)
        return -(-steps // self.split_k) * self.block_k

    def k_unroll(self, in_features: int) -> int:
        """gather: K chunks unrolled per step, at most `max_unroll`, spread evenly (K=3072 in
        chunks of 512: 2 steps of 3), so the steps are few and a step's loads fit the registers
        (all of K at once spills past K~3K at rank 16)."""
        chunks = -(-in_features // self.block_k)
        steps = -(-chunks // self.max_unroll)
        return -(-chunks // steps)

    def expand_columns(self, num_tokens: int, max_slice_size: int, num_slices: int) -> int:
        """sgmv's expand and gather: output columns per program, whole BLOCK_N tiles. Programs
        take several tiles where the grid would otherwise exceed about `expand_programs` (a
        few per SM), so each resolves its segments (sgmv) or shrinks its token (gather) once
        and pipelines its tiles' loads; small batches keep a tile per program for parallelism.
        The columns do not change any sum (each element of y gets one dot over the rank)."""
        tiles = -(-max_slice_size // self.block_n)
        others = max(1, -(-num_tokens // self.block_m) * num_slices)
        groups = max(1, min(tiles, -(-self.expand_programs // others)))
        return -(-tiles // groups) * self.block_n

    def num_splits(self, in_features: int) -> int:
        """Splits that own at least one K step (no program without work)."""
        return -(-in_features // self.k_per_split(in_features))


def gather_tiles(in_features: int, max_slice_size: int, block_r: int) -> LoRATiles:
    """Decode's fused kernel, one tile for every token count. A program shrinks its token once
    (A: 32-96 KB at K=1024-3072, rank 16, read from L2 or HBM), then walks its columns in
    tiles of 256; `expand_columns` gives small batches a tile per program (parallelism) and
    large ones several, aiming at about 384 programs, so a batch of 32 does not re-read each
    token's A once per tile. K goes in steps of up to 4 unrolled chunks of 512 (`k_unroll`).
    Tiles stay under ~16K elements per 256 threads whatever the rank width."""
    return LoRATiles(
        block_m=1,
        block_n=pow2_block(max_slice_size, min(256, 16384 // block_r)),
        block_k=pow2_block(in_features, 8192 // block_r),
        split_k=1,
        num_warps=8,
        num_stages=1,
        expand_programs=384,
    )


def sgmv_tiles(num_tokens: int, in_features: int, max_slice_size: int, num_slices: int, dtype=None):
    """Extend/mixed: the shrink split over K in planes of 256 input features (at most 16
    planes), so 1024 tokens of a qkv target run 32 blocks x 3 slices x 4 splits = 384 programs
    of 2 pipelined BLOCK_K steps instead of 96 walking all of K (128-wide steps; 64 in fp32,
    whose 3-stage pipeline would take 48 KB of shared memory). The split depends on K alone:
    see `LoRATiles.ORDER_FIELDS`. The expand, one pass over y, takes 128 columns per program."""
    block_m = 16 if num_tokens <= 128 else 32
    block_k = pow2_block(in_features, 64 if dtype == torch.float32 else 128)
    split = min(16, -(-in_features // 256))
    tiles = LoRATiles(block_m, pow2_block(max_slice_size, 128), block_k, split)
    return replace(tiles, split_k=tiles.num_splits(in_features))


def shape_key(in_features: int, max_slice_size: int, num_slices: int) -> str:
    return f"{in_features},{max_slice_size},{num_slices}"


def choose_tiles(style, num_tokens, in_features, max_slice_size, num_slices, block_r, x):
    """The tuned tiles of this launch's bucket, else the defaults."""
    shape = (in_features, max_slice_size, num_slices, block_r)
    return _choose(style, num_tokens, shape, x.device, x.dtype)


@functools.lru_cache(maxsize=4096)  # eager forwards call this per LoRA layer: keep it cheap
def _choose(style, num_tokens, shape, device, dtype) -> LoRATiles:
    in_features, max_slice_size, num_slices, block_r = shape
    if style == GATHER:
        default = gather_tiles(in_features, max_slice_size, block_r)
    else:
        default = sgmv_tiles(num_tokens, in_features, max_slice_size, num_slices, dtype)
    if device.type != "cuda" or block_r != 16:  # the table is tuned at rank width 16
        return default
    key = shape_key(in_features, max_slice_size, num_slices)
    name = torch.cuda.get_device_name(device)
    return tuned_tiles(tuned_table(), name, dtype, style, key, num_tokens, default) or default


def tuned_tiles(table: dict, device_name, dtype, style, key, num_tokens, default: LoRATiles):
    """The table's tiles: for sgmv, this token count's own bucket's (never a neighbour's), in
    the default's sum order; for gather, the shape's one entry (bucket "all")."""
    shapes = table.get(device_name, {}).get(str(dtype).removeprefix("torch."), {})
    bucket = ALL_TOKENS if style == GATHER else str(token_bucket(num_tokens))
    entry = shapes.get(style, {}).get(key, {}).get(bucket)
    if not entry:
        return None
    order = {name: getattr(default, name) for name in LoRATiles.ORDER_FIELDS}
    return LoRATiles(**entry) if style == GATHER else replace(LoRATiles(**entry), **order)


@functools.cache
def tuned_table() -> dict:
    return json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {}
