"""The one-launch argmax kernel on CUDA: equal to torch.argmax over a real vocabulary, eager and
captured in a CUDA graph replayed over other logits (the kernel leaves its scratch as it found
it, so every replay starts clean), and its scratch never grown during a capture. That the
sampling graphs write their tokens into the fed-token buffer is checked on CPU
(tests/test_dispatcher.py); greedy engine runs through it on the GPU, graphs on against off, in
tests/gpu/test_overlap_gpu.py and tests/gpu/test_full_mixed_gpu.py."""

from __future__ import annotations

import pytest
import torch

from tesela.executor.argmax import argmax_kernel, argmax_rows

VOCAB = 151_936  # qwen3's


def _logits(rows: int, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=generator, device="cuda").to(dtype)


@pytest.mark.parametrize("rows", [1, 7, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_rows_on_cuda_is_torchs_argmax(rows, dtype):
    logits = _logits(rows, seed=rows, dtype=dtype)
    logits[0, [11, VOCAB - 1, 70_000]] = 1e4  # tied in three programs: the first column wins
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))


def test_a_captured_launch_replays_right_over_new_logits():
    static = _logits(32, seed=0)
    out = torch.empty(32, dtype=torch.int64, device="cuda")
    argmax_kernel(static, out)  # before capture: sizes the scratch
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        argmax_kernel(static, out)
    for seed in range(1, 6):
        static.copy_(_logits(32, seed=seed) - seed)  # other maxima, lower ones included
        graph.replay()
        assert torch.equal(out, static.argmax(dim=-1)), seed
    eager = _logits(32, seed=9)  # the eager path shares the scratch the graph used
    assert torch.equal(argmax_rows(eager), eager.argmax(dim=-1))


def test_growing_the_scratch_during_a_capture_is_refused():
    logits = _logits(1, seed=1).expand(100_000, VOCAB)  # more rows than any run so far
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="before capturing"), torch.cuda.graph(graph):
        argmax_kernel(logits)
