"""The fused all-reduce + residual add + RMSNorm (tesela/distributed/fused_all_reduce.py).

The kernel reads its peers' buffers through raw addresses and pairs its programs with theirs
through signal-pad flags. Under Triton's interpreter the same kernel runs on CPU, one process
per rank (the interpreter's state is per process): every rank's buffer is a shared-memory
tensor, mapped into every process at its own address, which is what a symmetric-memory
rendezvous gives GPUs. The ranks start staggered, so a rank that read its peers before they
wrote (no barrier) would sum stale data. On two GPUs: tests/gpu/test_tensor_parallel_gpu.py.
"""

from __future__ import annotations

import os
import queue
import time

import pytest
import torch
import torch.multiprocessing as mp

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (set by .ci/run)", allow_module_level=True)
pytest.importorskip("triton")

from tesela.distributed.custom_all_reduce import choose_all_reduce_add_norm  # noqa: E402
from tesela.distributed.fused_all_reduce import (  # noqa: E402
    BUFFER_BYTES,
    DATA_BYTES,
    MAX_ROWS,
    AllReduceAddNorm,
)
from tesela.distributed.group import SINGLE  # noqa: E402
from tesela.layers.norm import add_rms_norm, all_reduce_add_rms_norm  # noqa: E402

EPS = 1e-6
STAGGER_S = 0.5


def rank_main(rank: int, buffers: list[torch.Tensor], cases: list, results) -> None:
    """One rank: its view of every buffer, then each case's call (rank r starts r * STAGGER_S
    late); sends back the outputs and its signal pads afterwards."""
    try:
        bases = [b.data_ptr() for b in buffers]
        kernel = AllReduceAddNorm(bases, [b + DATA_BYTES for b in bases], rank, "cpu", buffers)
        time.sleep(rank * STAGGER_S)
        outs = [kernel(xs[rank].clone(), res, w, EPS) for xs, res, w in cases]
        # By value (float32 holds bf16 exactly): shared tensors would die with this process.
        outs = [tuple(t.float().numpy() for t in pair) for pair in outs]
        pads = buffers[rank][DATA_BYTES:].view(torch.int32).numpy().copy()
        results.put((rank, outs, pads))
    except BaseException as exc:
        results.put((rank, repr(exc), None))


def run_ranks(world: int, cases: list) -> list:
    """Every rank's outputs, rank by rank."""
    context = mp.get_context("spawn")
    buffers = [torch.zeros(BUFFER_BYTES, dtype=torch.uint8).share_memory_() for _ in range(world)]
    results = context.Queue()
    processes = [
        context.Process(target=rank_main, args=(r, buffers, cases, results), daemon=True)
        for r in range(world)
    ]
    for process in processes:
        process.start()
    got = {}
    try:
        for _ in range(world):
            rank, outs, pads = results.get(timeout=180)
            assert pads is not None, f"rank {rank}: {outs}"
            assert not pads.any(), f"rank {rank} left flags set"
            got[rank] = [tuple(torch.from_numpy(a) for a in pair) for pair in outs]
    except queue.Empty:
        raise AssertionError("a rank is still waiting at a barrier") from None
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return [got[r] for r in range(world)]


def make_case(world: int, rows: int, hidden: int, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    xs = [(torch.randn(rows, hidden) * 3).to(dtype) for _ in range(world)]
    residual = torch.randn(rows, hidden).to(dtype)
    weight = (torch.rand(hidden) + 0.5).to(dtype)
    return xs, residual, weight


def reference(xs, residual, weight):
    """The all-reduce's sum (float32, rounded once), then the unfused add + norm."""
    total = torch.stack([x.float() for x in xs]).sum(0).to(xs[0].dtype)
    return add_rms_norm(total, residual, weight, EPS)


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_the_same_reduced_add_norm(world):
    """Rows of 96 (a masked tail), one row and several, bf16 and fp32, the row limit; the same
    case twice in a row (the flags return to 0 and pair up again)."""
    shapes = [(1, 96, torch.bfloat16), (5, 96, torch.bfloat16), (MAX_ROWS, 64, torch.float32)]
    cases = [make_case(world, *shape, seed=i) for i, shape in enumerate(shapes)]
    cases.append(cases[0])
    per_rank = run_ranks(world, cases)
    for i, (xs, residual, weight) in enumerate(cases):
        want_out, want_residual = reference(xs, residual, weight)
        first_out, first_residual = per_rank[0][i]
        for rank in range(world):
            out, new_residual = (t.to(residual.dtype) for t in per_rank[rank][i])
            # The same bits on every rank (a rank-order sum), equal to the unfused path up to
            # rounding (the interpreter rounds float32 -> bf16 its own way; bitwise on GPUs).
            assert torch.equal(out, first_out) and torch.equal(new_residual, first_residual)
            torch.testing.assert_close(new_residual, want_residual, rtol=1.6e-2, atol=4e-2)
            torch.testing.assert_close(out, want_out, rtol=1.6e-2, atol=4e-2)


def test_what_the_kernel_takes():
    buffers = [torch.zeros(BUFFER_BYTES, dtype=torch.uint8) for _ in range(2)]
    bases = [b.data_ptr() for b in buffers]
    rank = AllReduceAddNorm(bases, [b + DATA_BYTES for b in bases], 0, "cpu", buffers)
    assert rank.fits(torch.zeros(MAX_ROWS, 4096, dtype=torch.bfloat16))
    assert not rank.fits(torch.zeros(MAX_ROWS + 1, 4096, dtype=torch.bfloat16))  # NCCL's
    assert not rank.fits(torch.zeros(0, 4096))
    assert not rank.fits(torch.zeros(2, 4, 8))
    assert not rank.fits(torch.zeros(2, 8, dtype=torch.int32))
    assert not rank.fits(torch.zeros(8, 2).t())


def test_a_group_needs_its_own_rank_among_the_buffers():
    with pytest.raises(ValueError, match="not a group"):
        AllReduceAddNorm([1, 2], [3, 4], 2, "cpu")


def test_a_single_rank_is_the_plain_add_norm():
    torch.manual_seed(2)
    x, residual, weight = torch.randn(3, 32), torch.randn(3, 32), torch.rand(32)
    got = all_reduce_add_rms_norm(x.clone(), residual, weight, EPS, SINGLE)
    want = add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def choose(**kwargs):
    args = dict(device_type="cuda", world_size=2, enabled=True, env={})
    return choose_all_reduce_add_norm(**{**args, **kwargs})


def test_fused_where_every_condition_holds():
    choice = choose(env={"LOCAL_WORLD_SIZE": "2"})
    assert choice.kind == "fused" and "one kernel" in choice.reason


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        (dict(device_type="cpu"), "gloo"),
        (dict(world_size=1), "single rank"),
        (dict(enabled=False), "--no-fused-all-reduce-add-norm"),
        (dict(world_size=16), "NVLink domain"),
        (dict(world_size=4, env={"LOCAL_WORLD_SIZE": "2"}), "several hosts"),
    ],
)
def test_every_refusal_says_why(kwargs, why):
    choice = choose(**kwargs)
    assert choice.kind == "unfused" and why in choice.reason
