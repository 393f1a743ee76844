"""The segmented LoRA kernels (Triton, run by its interpreter on CPU) against a dense reference."""

from __future__ import annotations

import os

import pytest
import torch

from tesela.lora.kernels import GATHER, SGMV, reference_lora_delta, torch_lora, triton_lora
from tesela.lora.state import NO_SLOT, LoRABuffers

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
        x, a, b, OFFSETS, buffers.token_slot[:padded], buffers.ranks, buffers.scalings
    )
    torch.testing.assert_close((y - y0).double(), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(y[n:], y0[n:])
    if case != "base_only":
        assert expected[:n].abs().sum() > 0

    y_torch = y0.clone()
    torch_lora(x, y_torch, a, b, OFFSETS, segments, ranks, scalings)
    torch.testing.assert_close(y_torch, y, atol=1e-4, rtol=1e-4)


def test_segment_walk_covers_blocks_spanning_many_segments():
    """More segments than any cap, with blocks of 16/32 tokens straddling segment borders."""
    segments = [(i * 3, i * 3 + 3, i % SLOTS) for i in range(40)]  # 40 segments, 120 tokens
    n = 120
    a, b = make_weights(1)
    buffers = state(segments, n, 128, [8, 8, 8], [1.0, 1.0, 1.0])
    x, y = torch.randn(128, IN), torch.zeros(128, OFFSETS[-1])
    triton_lora(x, y, a, b, torch.tensor(OFFSETS, dtype=torch.int32), 32, buffers, SGMV)
    expected = reference_lora_delta(
        x, a, b, OFFSETS, buffers.token_slot, buffers.ranks, buffers.scalings
    )
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
    assert (y[:n].abs().sum(dim=1) > 0).all()  # no segment skipped
