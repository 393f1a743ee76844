"""The block manager and the scheduler, on their own (they import no torch)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tesela.config import SchedulerConfig
from tesela.engine.block_manager import BlockManager
from tesela.engine.request import Request
from tesela.engine.sampling_params import SamplingParams
from tesela.engine.scheduler import Scheduler


def make(n_prompt: int, rid: str, max_tokens: int = 4) -> Request:
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens))


def test_scheduler_and_block_manager_import_no_torch():
    code = (
        "import sys; import tesela.engine.scheduler, tesela.engine.block_manager; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_block_manager_allocates_frees_and_never_hands_out_the_dummy_block():
    bm = BlockManager(num_blocks=5, block_size=4)
    a, b = make(6, "a"), make(9, "b")
    bm.allocate(a, 6)
    assert len(a.block_ids) == 2 and 0 not in a.block_ids
    assert not bm.can_allocate(b, 9)  # 3 blocks needed, 2 free
    bm.allocate(b, 8)
    assert bm.num_free_blocks == 0 and 0 not in b.block_ids
    assert bm.slot(a, 5) == a.block_ids[1] * 4 + 1
    bm.free(a)
    assert bm.num_free_blocks == 2 and a.block_ids == []
    with pytest.raises(RuntimeError):
        bm.allocate(b, 30)


def run_to_completion(scheduler: Scheduler, max_steps: int = 500) -> list[list[int]]:
    steps = []
    for _ in range(max_steps):
        batch = scheduler.schedule()
        if batch is None:
            break
        assert batch.num_tokens <= scheduler.config.max_num_batched_tokens
        block_size = scheduler.block_manager.block_size
        for request, prefix, n in zip(
            batch.requests, batch.prefix_lens, batch.num_new_tokens, strict=True
        ):
            assert len(request.block_ids) * block_size >= prefix + n, "a token has no slot"
        steps.append(batch.num_new_tokens)
        sampled = [7 if batch.samples(i) else None for i in range(len(batch.requests))]
        scheduler.update(batch, sampled)
    assert not scheduler.has_unfinished()
    return steps


def test_chunked_prefill_respects_the_token_budget():
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=5), BlockManager(64, 4))
    request = make(12, "long", max_tokens=3)
    scheduler.add(request)
    steps = run_to_completion(scheduler)
    assert steps == [[5], [5], [2], [1], [1]]  # 3 prefill chunks, then 2 decode steps
    assert request.output_token_ids == [7, 7, 7] and request.finish_reason == "length"


def test_preemption_by_recompute_when_the_pool_runs_dry():
    bm = BlockManager(num_blocks=7, block_size=4)  # 6 usable blocks = 24 slots
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64), bm)
    requests = [make(8, f"r{i}", max_tokens=8) for i in range(3)]  # 16 tokens = 4 blocks each
    for r in requests:
        scheduler.add(r)
    run_to_completion(scheduler)
    assert scheduler.num_preemptions > 0
    assert all(r.output_token_ids == [7] * 8 and r.finish_reason == "length" for r in requests)
    assert bm.num_free_blocks == bm.num_usable_blocks
    assert sorted(r.request_id for r in scheduler.pop_finished()) == ["r0", "r1", "r2"]


def test_abort_frees_blocks():
    bm = BlockManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(SchedulerConfig(), bm)
    scheduler.add(make(10, "x"))
    scheduler.schedule()
    assert bm.num_used_blocks == 3
    assert scheduler.abort("x").finish_reason == "abort"
    assert bm.num_used_blocks == 0 and not scheduler.has_unfinished()
    assert scheduler.abort("missing") is None


def test_requests_that_cannot_fit_are_refused_up_front():
    scheduler = Scheduler(SchedulerConfig(max_model_len=32), BlockManager(4, 4))
    with pytest.raises(ValueError, match="empty"):
        scheduler.add(make(0, "empty"))
    with pytest.raises(ValueError, match="max_model_len"):
        scheduler.add(make(40, "too-long"))
    with pytest.raises(ValueError, match="KV cache holds only 12"):
        scheduler.add(make(20, "too-big-for-pool"))


def test_max_num_seqs_limits_rows():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=2), BlockManager(64, 4))
    for i in range(5):
        scheduler.add(make(3, f"r{i}"))
    assert len(scheduler.schedule().requests) == 2
