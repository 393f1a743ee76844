"""The fused all-reduce + residual add + RMSNorm (tesela/distributed/fused_all_reduce.py).

The kernel pushes its row into its peers' buffers through raw addresses and reads its own
buffer until every peer's words arrived (a word of all ones is "not written"). Under Triton's
interpreter the same kernel runs on CPU, one process per rank (the interpreter's state is per
process): every rank's buffer is a shared-memory tensor, mapped into every process at its own
address, which is what a symmetric-memory rendezvous gives GPUs. The ranks start staggered, so
a rank that summed before its peers pushed would sum unwritten words. On two GPUs:
tests/gpu/test_tensor_parallel_gpu.py.
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
    MAX_ROWS,
    AllReduceAddNorm,
    buffer_bytes,
)
from tesela.distributed.group import SINGLE  # noqa: E402
from tesela.layers.norm import add_rms_norm, all_reduce_add_rms_norm  # noqa: E402

EPS = 1e-6
STAGGER_S = 0.5


def rank_main(rank: int, buffer_sets: list, groups: list, results) -> None:
    """One rank: per group of cases (one row width and dtype each), a kernel over that group's
    buffers and each case's call (rank r starts r * STAGGER_S late); sends back the outputs
    and every kernel's per-row call counts."""
    try:
        time.sleep(rank * STAGGER_S)
        outs, counts = [], []
        for buffers, cases in zip(buffer_sets, groups, strict=True):
            kernel = AllReduceAddNorm([b.data_ptr() for b in buffers], rank, "cpu", buffers)
            for xs, res, w in cases:
                out, new_residual = kernel(xs[rank].clone(), res, w, EPS)
                # By value (float32 holds bf16 exactly): shared tensors die with this process.
                outs.append((out.float().numpy(), new_residual.float().numpy()))
            counts.append(kernel.counters.tolist())
        results.put((rank, outs, counts))
    except BaseException as exc:
        results.put((rank, repr(exc), None))


def run_ranks(world: int, groups: list) -> tuple[list, list]:
    """Every rank's outputs (case by case, groups in order) and call counts, rank by rank."""
    context = mp.get_context("spawn")
    buffer_sets = [
        [torch.full((buffer_bytes(world),), 0xFF, dtype=torch.uint8).share_memory_()
         for _ in range(world)]
        for _ in groups
    ]  # fmt: skip
    results = context.Queue()
    processes = [
        context.Process(target=rank_main, args=(r, buffer_sets, groups, results), daemon=True)
        for r in range(world)
    ]
    for process in processes:
        process.start()
    got, counts = {}, {}
    try:
        for _ in range(world):
            rank, outs, rank_counts = results.get(timeout=240)
            assert rank_counts is not None, f"rank {rank}: {outs}"
            got[rank] = [tuple(torch.from_numpy(a) for a in pair) for pair in outs]
            counts[rank] = rank_counts
    except queue.Empty:
        raise AssertionError("a rank is still waiting for its peers' rows") from None
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return [got[r] for r in range(world)], [counts[r] for r in range(world)]


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
    """bf16 rows of 96 (a masked tail): one row, five, one again, the row limit, then one row
    five more times (every slot reused: the slot rotation and the clearing hold up);
    then a kernel over other buffers for float32 rows of 64, with a NaN of all ones pushed."""
    bf16 = [make_case(world, rows, 96, torch.bfloat16, seed=i)
            for i, rows in enumerate([1, 5, 1, MAX_ROWS, 1, 1, 1, 1, 1])]  # fmt: skip
    fp32 = [make_case(world, 3, 64, torch.float32, seed=20)]
    fp32[0][0][0][1, 5] = torch.tensor(-1, dtype=torch.int32).view(torch.float32)  # all ones
    groups = [bf16, fp32]
    per_rank, counts = run_ranks(world, groups)
    cases = bf16 + fp32
    for i, (xs, residual, weight) in enumerate(cases):
        want_out, want_residual = reference(xs, residual, weight)
        first_out, first_residual = per_rank[0][i]
        for rank in range(world):
            out, new_residual = (t.to(residual.dtype) for t in per_rank[rank][i])
            # The same bits on every rank (a rank-order sum), equal to the unfused path up to
            # rounding (the interpreter rounds float32 -> bf16 its own way; bitwise on GPUs).
            assert torch.equal(out.isnan(), first_out.isnan())
            assert torch.equal(out.nan_to_num(), first_out.nan_to_num())
            assert torch.equal(new_residual.nan_to_num(), first_residual.nan_to_num())
            torch.testing.assert_close(
                new_residual, want_residual, rtol=1.6e-2, atol=4e-2, equal_nan=True
            )
            torch.testing.assert_close(out, want_out, rtol=1.6e-2, atol=4e-2, equal_nan=True)
    # Each row counted the calls that had it, on every rank.
    calls = [sum(rows > r for rows in (1, 5, 1, MAX_ROWS, 1, 1, 1, 1, 1)) for r in range(MAX_ROWS)]
    for rank_counts in counts:
        assert rank_counts[0] == calls and rank_counts[1] == [1, 1, 1] + [0] * (MAX_ROWS - 3)


def test_what_the_kernel_takes():
    buffers = [torch.full((buffer_bytes(2),), 0xFF, dtype=torch.uint8) for _ in range(2)]
    rank = AllReduceAddNorm([b.data_ptr() for b in buffers], 0, "cpu", buffers)
    assert rank.fits(torch.zeros(MAX_ROWS, 4096, dtype=torch.bfloat16))
    assert not rank.fits(torch.zeros(MAX_ROWS + 1, 4096, dtype=torch.bfloat16))  # NCCL's
    assert not rank.fits(torch.zeros(0, 4096))
    assert not rank.fits(torch.zeros(2, 4, 8))
    assert not rank.fits(torch.zeros(2, 8, dtype=torch.int32))
    assert not rank.fits(torch.zeros(8, 2).t())


def test_the_first_call_fixes_the_row_width_and_dtype():
    """A slot cleared with one word size does not read as cleared in another: after its first
    call a kernel takes that row width and dtype only (a single rank: no peer to wait for)."""
    buffers = [torch.full((buffer_bytes(1),), 0xFF, dtype=torch.uint8)]
    kernel = AllReduceAddNorm([buffers[0].data_ptr()], 0, "cpu", buffers)
    x, residual, weight = torch.randn(2, 32), torch.randn(2, 32), torch.rand(32)
    out, new_residual = kernel(x.clone(), residual, weight, EPS)
    want = add_rms_norm(x, residual, weight, EPS)
    torch.testing.assert_close(out, want[0])
    torch.testing.assert_close(new_residual, want[1])
    assert kernel.fits(torch.zeros(MAX_ROWS, 32))
    assert not kernel.fits(torch.zeros(2, 64)) and not kernel.fits(torch.zeros(2, 32).bfloat16())


def call_with_a_dead_peer(results) -> None:
    """Rank 0 of two whose peer never pushes: abort() after ABORT_AFTER_S (as the engine's
    watchdog would), then one more call; sends back how long the first call took."""
    import threading

    buffers = [torch.full((buffer_bytes(2),), 0xFF, dtype=torch.uint8) for _ in range(2)]
    kernel = AllReduceAddNorm([b.data_ptr() for b in buffers], 0, "cpu", buffers)
    x, residual, weight = torch.randn(1, 32), torch.randn(1, 32), torch.rand(32)
    threading.Timer(ABORT_AFTER_S, kernel.abort).start()
    started = time.monotonic()
    kernel(x.clone(), residual, weight, EPS)
    waited = time.monotonic() - started
    kernel(x.clone(), residual, weight, EPS)  # an aborted kernel waits no more
    results.put(waited)


ABORT_AFTER_S = 0.5


def test_abort_ends_a_wait_for_a_peer_that_never_pushes():
    """The call waits for the dead peer's row until the flag is raised, then returns (in its
    own process: a kernel that ignored the flag would wait for ever)."""
    context = mp.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=call_with_a_dead_peer, args=(results,), daemon=True)
    process.start()
    try:
        waited = results.get(timeout=60)
    except queue.Empty:
        pytest.fail("the kernel kept waiting for its dead peer after abort()")
    finally:
        process.kill()
        process.join()
    assert waited >= ABORT_AFTER_S  # it did wait for the peer until then


def test_a_group_needs_its_own_rank_among_the_buffers():
    with pytest.raises(ValueError, match="not a group"):
        AllReduceAddNorm([1, 2], 2, "cpu")


def test_a_single_rank_is_the_plain_add_norm():
    torch.manual_seed(2)
    x, residual, weight = torch.randn(3, 32), torch.randn(3, 32), torch.rand(32)
    got = all_reduce_add_rms_norm(x.clone(), residual, weight, EPS, SINGLE)
    want = add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def choose(**kwargs):
    args = dict(device_type="cuda", world_size=2, enabled=True, env={})
    return choose_all_reduce_add_norm(**{**args, **kwargs})


def test_cpu_ranks_fuse_under_the_interpreter():
    choice = choose(device_type="cpu", interpreted=True)
    assert choice.kind == "fused" and "interpreter" in choice.reason


def test_fused_where_every_condition_holds():
    choice = choose(env={"LOCAL_WORLD_SIZE": "2"})
    assert choice.kind == "fused" and "one kernel" in choice.reason


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        (dict(device_type="cpu"), "gloo"),
        (dict(device_type="cpu", interpreted=True, enabled=False), "turned off"),
        (dict(world_size=1), "single rank"),
        (dict(enabled=False), "--no-fused-all-reduce-add-norm"),
        (dict(world_size=16), "NVLink domain"),
        (dict(world_size=4, env={"LOCAL_WORLD_SIZE": "2"}), "several hosts"),
    ],
)
def test_every_refusal_says_why(kwargs, why):
    choice = choose(**kwargs)
    assert choice.kind == "unfused" and why in choice.reason
