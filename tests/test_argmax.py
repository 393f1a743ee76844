"""The one-launch argmax kernel (tesela/executor/argmax.py) against torch.argmax, under the
Triton interpreter: ties go to the first column, negative and -inf logits order as floats, a
row spanning several programs finds its maximum in any of them, and the scratch is left as
found (a second launch, as a graph replay would run it, sees nothing of the first). The same
kernel on CUDA, captured and replayed: tests/gpu/test_argmax_gpu.py."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (set by .ci/run)", allow_module_level=True)
pytest.importorskip("triton")

from tesela.executor.argmax import BLOCK, argmax_kernel, argmax_rows  # noqa: E402

WIDE = 2 * BLOCK + 123  # three programs per row, the last one partial


def _logits(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_random_rows_match_torch(dtype):
    logits = _logits(4, WIDE, dtype)
    logits[1, BLOCK + 7] = 50.0  # the maximum in the second program
    logits[2, WIDE - 1] = 50.0  # in the last column of the partial one
    assert torch.equal(argmax_kernel(logits), logits.argmax(dim=-1))


def test_ties_go_to_the_first_column_across_programs():
    logits = torch.zeros(3, WIDE, dtype=torch.bfloat16)
    logits[0, [5, BLOCK + 1, WIDE - 1]] = 3.0  # tied in three programs
    logits[1, [2 * BLOCK + 9, BLOCK + 100]] = 1.0  # the later program holds the earlier column
    # row 2: all zeros, every column tied
    tokens = argmax_kernel(logits)
    assert tokens.tolist() == [5, BLOCK + 100, 0] == logits.argmax(dim=-1).tolist()


def test_negative_and_infinite_logits_order_as_floats():
    logits = torch.full((4, WIDE), -5.0)
    logits[0, 17] = -4.5  # all negative: the least negative wins
    logits[1] = float("-inf")  # nothing but -inf: the first column, as torch says
    logits[1, BLOCK + 3] = -1e30
    logits[2] = float("-inf")
    logits[3, [9, BLOCK]] = float("inf")
    tokens = argmax_kernel(logits)
    assert tokens.tolist() == [17, BLOCK + 3, 0, 9] == logits.argmax(dim=-1).tolist()


def test_a_second_launch_sees_nothing_of_the_first():
    """The scratch is reset by the launch that used it: a replay of the same launch over other
    logits (a smaller maximum somewhere else) finds its own maximum, every time."""
    out = torch.empty(2, dtype=torch.int64)
    for seed in range(3):
        logits = _logits(2, WIDE, torch.bfloat16, seed=seed) - 10.0 * seed
        assert argmax_kernel(logits, out) is out
        assert torch.equal(out, logits.argmax(dim=-1))


def test_strided_rows_and_the_out_checks():
    wide = _logits(3, 2 * WIDE, torch.bfloat16)
    view = wide[:, ::2]  # rows of stride 2: copied to contiguous first
    assert torch.equal(argmax_kernel(view), view.argmax(dim=-1))
    rows = wide[:, :WIDE]  # a row stride wider than the row
    assert torch.equal(argmax_kernel(rows), rows.argmax(dim=-1))
    with pytest.raises(ValueError, match="int64"):
        argmax_kernel(rows, torch.empty(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[rows, vocab\]"):
        argmax_kernel(rows[0])
    assert argmax_kernel(rows[:0]).shape == (0,)


def test_argmax_rows_off_cuda_is_torch_and_fills_out():
    logits = _logits(3, 50, torch.float32)
    out = torch.full((3,), -1, dtype=torch.int64)
    assert argmax_rows(logits, out) is out
    assert torch.equal(out, logits.argmax(dim=-1))


def test_the_scratch_only_grows_and_keeps_what_it_outgrew():
    """A launch over more rows than any before grows the per-device scratch; the buffer it
    outgrew stays allocated (a graph captured earlier still reads it), and the new one starts
    as the kernel leaves it."""
    import gc
    import weakref

    from tesela.core.scratch import DeviceScratch

    scratch = DeviceScratch("test", torch.int64, -7)
    small = scratch.get(torch.device("cpu"), 10)
    assert small.numel() >= 10 and scratch.get(torch.device("cpu"), 10) is small
    alive = weakref.ref(small)
    del small
    large = scratch.get(torch.device("cpu"), 1000)
    gc.collect()
    assert alive() is not None and large.numel() >= 1000
    assert bool((large == -7).all())
