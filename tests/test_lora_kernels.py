"""The segmented LoRA kernels (Triton, run by its interpreter on CPU) against a dense reference."""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, replace

import pytest
import torch

from tesela.core.scratch import SPLIT_K_ARRIVALS
from tesela.lora.fused_gemm import FusedTiles, lora_gemm
from tesela.lora.kernels import GATHER, SGMV, reference_lora_delta, torch_lora, triton_lora
from tesela.lora.state import NO_SLOT, LoRABuffers
from tesela.lora.tiles import LoRATiles, gather_tiles, sgmv_tiles, tuned_tiles

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels run on CPU under TRITON_INTERPRET=1",
)

IN, OFFSETS = 32, (0, 32, 48, 64)  # a fused qkv-like target: slices of 32, 16, 16 rows
SLOTS, MAX_RANK = 3, 8


def make_weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(SLOTS, len(OFFSETS) - 1, MAX_RANK, IN, generator=g) * 0.3
    b = torch.randn(SLOTS, OFFSETS[-1], MAX_RANK, generator=g) * 0.3
    return a, b


def state(segments, num_tokens, max_tokens, ranks, scalings):
    buffers = LoRABuffers.allocate(max_tokens, SLOTS, "cpu")
    buffers.write(segments, num_tokens)
    buffers.ranks.copy_(torch.tensor(ranks, dtype=torch.int32))
    buffers.scalings.copy_(torch.tensor(scalings))
    return buffers


# Segments (start, end, slot): base rows, several adapters, one adapter in two places, and more
# segments than a block of tokens holds (decode-like runs of length 1).
CASES = {
    "extend": [(0, 5, 0), (5, 9, NO_SLOT), (9, 30, 2), (30, 33, 0)],
    "decode": [(i, i + 1, [0, 1, NO_SLOT, 2][i % 4]) for i in range(37)],
    "base_only": [(0, 20, NO_SLOT)],
}


@pytest.mark.parametrize("style", [SGMV, GATHER])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_kernels_match_the_reference(style, case):
    segments = CASES[case]
    n = segments[-1][1]
    padded = n + 7  # a captured size above the batch: padding rows must stay untouched
    a, b = make_weights()
    ranks, scalings = [8, 3, 5], [0.5, 2.0, 1.25]
    buffers = state(segments, n, 64, ranks, scalings)
    # A slot's rows past its rank hold junk (a previous, larger adapter): the rank masks them.
    a[1, :, 3:] = 100.0
    b[1, :, 3:] = 100.0
    x = torch.randn(padded, IN)
    y0 = torch.randn(padded, OFFSETS[-1])
    y = y0.clone()
    offsets = torch.tensor(OFFSETS, dtype=torch.int32)
    triton_lora(x, y, a, b, offsets, 32, buffers, style)
    expected = reference_lora_delta(
        x, a, b, OFFSETS, buffers.slots_of(padded), buffers.ranks, buffers.scalings
    )
    torch.testing.assert_close((y - y0).double(), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(y[n:], y0[n:])
    if case != "base_only":
        assert expected[:n].abs().sum() > 0

    y_torch = y0.clone()
    torch_lora(x, y_torch, a, b, OFFSETS, segments, ranks, scalings)
    torch.testing.assert_close(y_torch, y, atol=1e-4, rtol=1e-4)


def test_buffers_hold_the_last_batch_written_and_skip_only_a_repeat():
    """A write of the segments the rows already hold is skipped (decode steps of the same
    requests); any other write, even of the same token count, lands whole."""
    buffers = LoRABuffers.allocate(16, SLOTS, "cpu")
    decode = [(t, t + 1, t % SLOTS) for t in range(4)]
    swapped = [(t, t + 1, (t + 1) % SLOTS) for t in range(4)]
    extend = [(0, 3, 1), (3, 4, NO_SLOT)]
    for segments in (decode, swapped, decode, decode, extend, decode):
        buffers.write(segments, 4)
        expected = [slot for start, end, slot in segments for _ in range(start, end)]
        assert buffers.slots_of(6).tolist() == expected + [NO_SLOT, NO_SLOT]
        assert buffers.seg_start[: len(segments) + 1].tolist() == [s for s, _, _ in segments] + [4]
        assert buffers.seg_slot[: len(segments)].tolist() == [slot for _, _, slot in segments]


def test_segment_walk_covers_blocks_spanning_many_segments():
    """More segments than any cap, with blocks of 16/32 tokens straddling segment borders."""
    segments = [(i * 3, i * 3 + 3, i % SLOTS) for i in range(40)]  # 40 segments, 120 tokens
    n = 120
    a, b = make_weights(1)
    buffers = state(segments, n, 128, [8, 8, 8], [1.0, 1.0, 1.0])
    x, y = torch.randn(128, IN), torch.zeros(128, OFFSETS[-1])
    triton_lora(x, y, a, b, torch.tensor(OFFSETS, dtype=torch.int32), 32, buffers, SGMV)
    expected = reference_lora_delta(
        x, a, b, OFFSETS, buffers.slots_of(128), buffers.ranks, buffers.scalings
    )
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
    assert (y[:n].abs().sum(dim=1) > 0).all()  # no segment skipped


def random_case(num_tokens: int, slots: int, seed: int):
    """Segments of random lengths and slots (slot -1 among them) over `num_tokens` tokens."""
    g = torch.Generator().manual_seed(seed)
    segments, start = [], 0
    while start < num_tokens:
        end = min(num_tokens, start + int(torch.randint(1, 6, (1,), generator=g)))
        segments.append((start, end, int(torch.randint(-1, slots, (1,), generator=g))))
        start = end
    return segments


# (K, slice offsets, tiles): K not a multiple of BLOCK_K, slices wider than a column block and
# of unequal sizes (column blocks past a slice's end), and for sgmv every way of splitting K.
TILED = {
    # 5 chunks of K, the last 8 wide, in 3 steps of 2 (the last step's second chunk empty)
    "gather_k_tail": (72, (0, 40, 64), LoRATiles(1, 16, 16, 1, max_unroll=2)),
    "gather_one_chunk": (72, (0, 24), LoRATiles(1, 32, 128, 1)),
    # One program per (token, slice) shrinks once, then walks 40 columns as 16+16+8.
    "gather_column_walk": (72, (0, 40, 64), LoRATiles(1, 16, 16, 1, expand_programs=1)),
    "sgmv_split_4": (200, (0, 40, 64), LoRATiles(16, 16, 16, 4)),  # K planes of 64,64,64,8
    "sgmv_split_13": (200, (0, 24), LoRATiles(16, 16, 16, 13)),  # one 16-wide step per plane
    "sgmv_split_6_is_5": (200, (0, 40, 64), LoRATiles(16, 32, 16, 6)),  # 3 steps each: 5 used
    "sgmv_unsplit": (72, (0, 40, 64), LoRATiles(32, 16, 16, 1)),
    # One expand program per (token block, slice) walks all its column tiles (40 = 16+16+8).
    "sgmv_column_walk": (200, (0, 40, 64), LoRATiles(16, 16, 16, 4, expand_programs=1)),
}


@pytest.mark.parametrize("case", list(TILED))
def test_tiled_kernels_match_the_reference(case):
    """Decode's fused kernel and the split-K sgmv pair against the fp64 reference, with base
    rows, padding, ranks below the slot's width (junk past them) and reused slots."""
    in_features, offsets, tiles = TILED[case]
    style = GATHER if case.startswith("gather") else SGMV
    n, slots, max_rank = 45, 3, 8
    g = torch.Generator().manual_seed(len(case))
    a = torch.randn(slots, len(offsets) - 1, max_rank, in_features, generator=g) * 0.2
    b = torch.randn(slots, offsets[-1], max_rank, generator=g) * 0.2
    # Slot 2 serves a rank-5 adapter now; its rows past rank 5 are junk, NaN here, so that
    # both the A and the B rank masks matter (a finite junk row of one meets zeros of the other).
    a[2, :, 5:] = b[2, :, 5:] = float("nan")
    buffers = LoRABuffers.allocate(64, slots, "cpu")
    buffers.write(random_case(n, slots, seed=len(case)), n)
    buffers.ranks.copy_(torch.tensor([8, 1, 5], dtype=torch.int32))
    buffers.scalings.copy_(torch.tensor([0.5, 3.0, 1.5]))
    x, y0 = torch.randn(n + 6, in_features, generator=g), torch.randn(n + 6, offsets[-1])
    y = y0.clone()
    max_size = max(hi - lo for lo, hi in zip(offsets[:-1], offsets[1:], strict=True))
    device_offsets = torch.tensor(offsets, dtype=torch.int32)
    triton_lora(x, y, a, b, device_offsets, max_size, buffers, style, tiles)
    expected = reference_lora_delta(
        x, a, b, offsets, buffers.slots_of(n + 6), buffers.ranks, buffers.scalings
    )
    torch.testing.assert_close((y - y0).double(), expected, atol=1e-4, rtol=1e-4)
    base_rows = buffers.slots_of(n + 6) == NO_SLOT  # base rows and padding: untouched
    assert torch.equal(y[base_rows], y0[base_rows]) and (~base_rows).sum() > n // 2
    assert (expected[~base_rows].abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("in_features", [16, 72, 200, 1024, 3072])
@pytest.mark.parametrize("split_k", [1, 2, 3, 5, 16])
def test_k_splits_cover_k_once_and_each_owns_a_step(in_features, split_k):
    """Every shrink plane the expand sums is written (no split without a K step), and the
    splits' K ranges tile [0, K) exactly."""
    tiles = LoRATiles(16, 16, 64, split_k)
    per_split, splits = tiles.k_per_split(in_features), tiles.num_splits(in_features)
    ranges = [(i * per_split, min((i + 1) * per_split, in_features)) for i in range(splits)]
    assert per_split % 64 == 0 and splits <= split_k
    assert all(lo < hi for lo, hi in ranges)
    assert ranges[0][0] == 0 and ranges[-1][1] == in_features
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(splits - 1))


@pytest.mark.parametrize("num_tokens", [0, 1, 16, 100, 1024, 8192])
@pytest.mark.parametrize("slices", [(2048, 1024, 1024), (3072, 3072), (1024,)])
def test_expand_programs_cover_every_column_in_whole_tiles(num_tokens, slices):
    """The expand's column ranges are whole BLOCK_N tiles that cover the widest slice; large
    batches get several tiles per program (fewer programs), small ones a tile each."""
    tiles = sgmv_tiles(num_tokens, 1024, max(slices), len(slices))
    columns = tiles.expand_columns(num_tokens, max(slices), len(slices))
    programs = -(-num_tokens // tiles.block_m) * -(-max(slices) // columns) * len(slices)
    assert columns % tiles.block_n == 0 and columns >= tiles.block_n
    assert (
        -(-max(slices) // columns) * columns
        >= max(slices)
        > (-(-max(slices) // columns) - 1) * columns
    )
    if num_tokens <= 16:
        assert columns == tiles.block_n
    if num_tokens >= 1024:
        assert programs <= 2 * tiles.expand_programs


def test_a_tokens_sum_order_depends_on_the_shape_alone():
    """The K step and the split planes (the order a token's shrink adds its products in) are
    the same at every token count and for tuned tiles: a token's delta is the same in any
    batch, eager (its own count) or in a graph (a padded size); prefill splits K."""
    for K in (200, 1024, 3072, 14336):
        sgmv = {(t.block_k, t.split_k) for n in (1, 16, 100, 1024, 8192)
                for t in [sgmv_tiles(n, K, 2048, 3)]}  # fmt: skip
        assert len(sgmv) == 1
    assert sgmv_tiles(64, 3072, 1024, 1).num_splits(3072) == 12
    decode = gather_tiles(3072, 2048, block_r=16)
    steps = -(-3072 // (decode.block_k * decode.k_unroll(3072)))
    assert steps <= 2  # one or two memory round trips for the shrink, not 48 serial steps


def test_a_tuned_tile_serves_its_own_bucket_only_in_the_default_sum_order():
    """Table lookup: a token count takes its own bucket's tuned tiles (20 tokens: bucket 32),
    never a neighbour bucket's (33 tokens: bucket 64, untuned: the defaults); a tuned entry
    never changes the sum order (its K step and splits are the default's)."""
    default = sgmv_tiles(32, 1024, 2048, 3)
    tiles = LoRATiles(32, 256, 64, 2, num_warps=8)
    table = {"H100": {"bfloat16": {SGMV: {"1024,2048,3": {"32": asdict(tiles)}}}}}
    look = functools.partial(tuned_tiles, table, "H100", torch.bfloat16, SGMV, "1024,2048,3")
    tuned = replace(tiles, block_k=default.block_k, split_k=default.split_k)
    assert look(20, default) == tuned and look(32, default) == tuned
    assert look(33, default) is None and look(16, default) is None
    assert tuned_tiles(table, "H200", torch.bfloat16, SGMV, "1024,2048,3", 32, default) is None
    assert tuned_tiles(table, "H100", torch.float16, SGMV, "1024,2048,3", 32, default) is None
    # Decode tiles: one per shape (their every field orders the sums), whatever the count.
    gather = {"1024,2048,3": {"all": asdict(tiles)}}
    table["H100"]["bfloat16"][GATHER] = gather
    assert all(
        tuned_tiles(table, "H100", torch.bfloat16, GATHER, "1024,2048,3", n, default) == tiles
        for n in (1, 7, 300)
    )


@pytest.mark.parametrize("style", [GATHER, SGMV])
def test_every_tile_the_tuner_tries_computes_the_same_delta(style):
    """The tuner's candidates (run here on small shapes, a sample) are valid tiles:
    each adds the delta the default tiles add, so the tuner's pick is a speed choice only."""
    from tesela.tune.lora import Case, gather_candidates, sgmv_candidates

    num_tokens, in_features, sizes = (3, 40, (24, 8)) if style == GATHER else (20, 200, (24, 8))
    case = Case(style, in_features, sizes, num_tokens, 3, torch.float32, device="cpu")
    default = (
        gather_tiles(in_features, 24, 16)
        if style == GATHER
        else replace(sgmv_tiles(num_tokens, in_features, 24, 2), block_k=16, split_k=4)
    )
    expected = case.output(default)
    candidates = (
        gather_candidates(default)
        if style == GATHER
        else sgmv_candidates(default, 0) + sgmv_candidates(default, 1, default)
    )
    for tiles in candidates[:: 3 if style == GATHER else 4]:
        torch.testing.assert_close(case.output(tiles), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, case.y0)


# ---- the base GEMM with the delta inside it (tesela/lora/fused_gemm.py)

FUSED_TILES = {
    # tiles of 16 x 16 over K steps of 16: blocks spanning segments and the K / token tails
    "small": FusedTiles(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=1),
    "tall": FusedTiles(block_m=32, block_n=16, block_k=32, group_m=1, num_warps=4, num_stages=1),
    # one launch for every token (at most 64): each slot's shrink in the K loop (3 slots: a
    # 4th, masked, in the kernel's slot tile)
    "one_launch": FusedTiles(block_n=16, block_k=16, num_warps=4, num_stages=1, small=True),
    # the same over 3 K ranges per column tile (the last one empty), summed by the last to arrive
    "split": FusedTiles(block_n=16, block_k=16, num_stages=1, small=True, split_k=3),
}


# Rows of 8 tokens cycling slot 0, the NaN-padded slot 1 and the base model: 16-token blocks of
# two segments, whose rows must add exact zeros for the other's A (rank 8 against 3).
FUSED_CASES = {**CASES, "pairs": [(i, i + 8, [0, 1, NO_SLOT][i // 8 % 3]) for i in range(0, 48, 8)]}


@pytest.mark.parametrize("tiles", list(FUSED_TILES))
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_gemm_equals_the_base_gemm_plus_the_reference_delta(tiles, case):
    """Blocks of one adapter, blocks spanning segments (an epilogue MMA per segment), base
    rows and padding rows (slot -1: the plain GEMM), with junk, NaN included, in a slot's rows
    past its adapter's rank (masked in A, s and B, so it adds nothing)."""
    segments = FUSED_CASES[case]
    n = segments[-1][1]
    padded = n + 7
    a, b = make_weights()
    a[1, :, 3:], b[1, :, 3:] = float("nan"), float("nan")
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(OFFSETS[-1], IN, generator=g), torch.randn(OFFSETS[-1], generator=g)
    x = torch.randn(padded, IN, generator=g)
    buffers = state(segments, n, 64, [8, 3, 5], [0.5, 2.0, 1.25])
    sizes = [hi - lo for lo, hi in zip(OFFSETS[:-1], OFFSETS[1:], strict=True)]
    shrink = LoRATiles(block_m=16, block_n=16, block_k=16, split_k=2)  # two planes of s
    y = lora_gemm(x, weight, bias, a, b, sizes, buffers, FUSED_TILES[tiles], shrink)
    assert not SPLIT_K_ARRIVALS.get(
        x.device, 0
    ).any()  # split-K: every column tile's count is back to zero
    delta = reference_lora_delta(
        x, a, b, OFFSETS, buffers.slots_of(padded), buffers.ranks, buffers.scalings
    )
    expected = x.double() @ weight.double().T + bias.double() + delta
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
    if case != "base_only":
        assert delta.abs().max() > 1.0  # the adapters really add something


def test_fused_tiles_lie_inside_one_slice():
    assert FusedTiles(block_n=128).fits((2048, 1024, 1024))
    assert not FusedTiles(block_n=256).fits((2048, 640, 640))
