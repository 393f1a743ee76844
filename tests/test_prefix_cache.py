"""The prefix cache in the block manager and the scheduler, without a model (no torch).

The property tests drive the real scheduler with random operation sequences (requests that
share prefixes, namespaces, steps, aborts, a pool small enough to preempt and evict) over a
*symbolic* KV pool: every slot a forward writes holds the identity of what its KV depends on
(the request's namespace and all tokens up to that position). Before each simulated forward,
every slot a row attends to must hold exactly the right identity, which is what makes cached
attention equal to recomputed attention; no forward may write a block that is in the cache.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tesela.config import SchedulerConfig
from tesela.engine.block_manager import BlockManager
from tesela.engine.request import Request
from tesela.engine.sampling_params import SamplingParams
from tesela.engine.scheduler import Scheduler


def make(tokens, rid, max_tokens=4, salt=None, lora=None) -> Request:
    params = SamplingParams(max_tokens=max_tokens)
    return Request(rid, list(tokens), params, lora_id=lora, cache_salt=salt)


class SymbolicKV:
    """What each slot's KV was computed from: (namespace, tokens up to and including it)."""

    def __init__(self, block_manager: BlockManager) -> None:
        self.bm = block_manager
        self.slots: dict[int, tuple] = {}

    @staticmethod
    def identity(request: Request, position: int) -> tuple:
        return (request.extra_keys, tuple(request.all_token_ids[: position + 1]))

    def forward(self, batch) -> None:
        for row, request in enumerate(batch.requests):
            prefix, n = batch.prefix_lens[row], batch.num_new_tokens[row]
            for position in range(prefix):  # what attention reads
                slot = self.bm.slot(request, position)
                assert self.slots.get(slot) == self.identity(request, position), (
                    f"{request.request_id} reads wrong KV at position {position}"
                )
            for position in range(prefix, prefix + n):  # what the forward writes
                block = request.block_ids[position // self.bm.block_size]
                assert self.bm._block_hashes[block] is None, f"cached block {block} written"
                self.slots[self.bm.slot(request, position)] = self.identity(request, position)


def holders(scheduler: Scheduler) -> list[Request]:
    return [r for r in list(scheduler.running) + list(scheduler.waiting) if r.block_ids]


def step(scheduler: Scheduler, kv: SymbolicKV, token: int) -> None:
    batch = scheduler.schedule()
    if batch is None:
        return
    assert batch.num_tokens <= scheduler.config.max_num_batched_tokens
    assert min(batch.num_new_tokens) >= 1  # even a fully cached prompt runs its last token
    kv.forward(batch)
    scheduler.update(
        batch, [token if batch.samples(i) else None for i in range(len(batch.requests))]
    )


PREFIXES = [[5] * 3, list(range(1, 9)), list(range(1, 12)), [7, 7, 8, 8, 9, 9, 1]]

operation = st.one_of(
    st.tuples(
        st.just("add"),
        st.integers(0, len(PREFIXES) - 1),  # shared prefix
        st.lists(st.integers(1, 4), max_size=6),  # own suffix
        st.sampled_from([None, "a", "b"]),  # cache salt
        st.integers(1, 6),  # max_tokens
    ),
    st.tuples(st.just("step"), st.integers(1, 3)),
    st.tuples(st.just("abort"), st.integers(0, 50)),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(operation, min_size=1, max_size=40),
    st.integers(6, 14),  # pool blocks: small enough to preempt and evict
    st.sampled_from([2, 4]),  # block size
    st.sampled_from([3, 8, 64]),  # token budget: chunks or not
)
def test_random_operation_sequences_keep_the_cache_consistent(ops, num_blocks, block_size, budget):
    bm = BlockManager(num_blocks, block_size)
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=4, max_model_len=40)
    scheduler = Scheduler(config, bm)
    kv = SymbolicKV(bm)
    ids = []
    for op in ops:
        if op[0] == "add":
            _, prefix, suffix, salt, max_tokens = op
            request = make(PREFIXES[prefix] + suffix, f"r{len(ids)}", max_tokens, salt=salt)
            try:
                scheduler.add(request)
            except ValueError:  # too big for this pool: refused up front
                continue
            ids.append(request.request_id)
        elif op[0] == "step":
            step(scheduler, kv, token=op[1])
        elif ids:
            scheduler.abort(ids[op[1] % len(ids)])
        bm.check_invariants(holders(scheduler))
    for _ in range(400):
        if not scheduler.has_unfinished():
            break
        step(scheduler, kv, token=1)
        bm.check_invariants(holders(scheduler))
    assert not scheduler.has_unfinished()
    assert bm.num_free_blocks == bm.num_usable_blocks  # nothing leaked
    assert bm.num_used_blocks == 0


def test_a_second_request_shares_the_full_blocks_of_the_first():
    bm = BlockManager(num_blocks=32, block_size=4)
    scheduler = Scheduler(SchedulerConfig(), bm)
    kv = SymbolicKV(bm)
    first = make(range(1, 11), "first")  # 10 tokens: 2 full blocks and a partial one
    scheduler.add(first)
    step(scheduler, kv, 9)
    assert bm.num_cached_blocks == 2  # only full, computed blocks are registered
    second = make(list(range(1, 11)) + [3], "second")
    scheduler.add(second)
    batch = scheduler.schedule()
    row = batch.requests.index(second)
    assert batch.prefix_lens[row] == 8 and batch.num_new_tokens[row] == 3  # only uncached
    assert second.block_ids[:2] == first.block_ids[:2]
    assert second.block_ids[2] != first.block_ids[2]  # the partial block is never shared
    assert second.num_cached_tokens == 8 and bm.stats.hit_tokens == 8


def test_a_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=32, block_size=4)
    scheduler = Scheduler(SchedulerConfig(), bm)
    kv = SymbolicKV(bm)
    scheduler.add(make(range(1, 13), "a", max_tokens=2))  # 12 tokens = 3 full blocks
    while scheduler.has_unfinished():
        step(scheduler, kv, 9)
    again = make(range(1, 13), "b")
    scheduler.add(again)
    batch = scheduler.schedule()
    # The last block holds the last token, which must run for logits; a cached block is
    # never written, so the whole last block is the request's own.
    assert batch.prefix_lens == [8] and batch.num_new_tokens == [4] and batch.samples(0)
    kv.forward(batch)


def test_namespaces_do_not_share():
    bm = BlockManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(), bm)
    kv = SymbolicKV(bm)
    tokens = list(range(1, 18))
    scheduler.add(make(tokens, "plain"))
    step(scheduler, kv, 9)
    for rid, salt, lora in [
        ("salted", "s", None),
        ("adapter", None, "lora-1"),
        ("same", None, None),
    ]:
        request = make(tokens, rid, salt=salt, lora=lora)
        scheduler.add(request)
        step(scheduler, kv, 9)
        expected = 16 if rid == "same" else 0
        assert request.num_cached_tokens == expected, rid


def test_preempted_request_keeps_nothing_and_hits_its_own_blocks_on_recompute():
    bm = BlockManager(num_blocks=9, block_size=4)  # 8 usable blocks
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64), bm)
    kv = SymbolicKV(bm)
    old = make(range(1, 13), "old", max_tokens=12)
    scheduler.add(old)
    step(scheduler, kv, 9)
    new = make(range(50, 62), "new", max_tokens=12)
    scheduler.add(new)
    while old.num_preemptions == 0 and new.num_preemptions == 0:
        step(scheduler, kv, 9)
    victim = old if old.num_preemptions else new
    assert victim.block_ids == [] and victim.num_computed_tokens == 0
    assert bm.num_cached_blocks > 0  # its computed blocks stayed cached
    while scheduler.has_unfinished():
        step(scheduler, kv, 9)
        bm.check_invariants(holders(scheduler))
    assert bm.num_free_blocks == bm.num_usable_blocks
    assert victim.num_cached_tokens == 0  # a recompute is not counted as a user-visible hit


def test_eviction_takes_never_cached_blocks_first_then_the_least_recently_released():
    bm = BlockManager(num_blocks=7, block_size=2)  # 6 usable blocks
    a, b = make([1, 2, 3, 4, 5], "a"), make([6, 7, 8, 9, 10], "b")
    for request in (a, b):  # 2 full blocks (cached) and a partial one each
        bm.allocate(request, 5)
        request.num_computed_tokens = 5
        bm.cache_full_blocks(request)
    a_blocks = list(a.block_ids)
    assert bm.num_cached_blocks == 4 and bm.num_free_blocks == 0
    bm.free(a)  # released first: a's tail block is the least recently released
    bm.free(b)
    assert bm.num_evictable_blocks == 4 and bm.num_free_blocks == 6
    c = make([20, 21, 22, 23, 24, 25], "c")
    bm.allocate(c, 6)  # the 2 partial blocks, then one eviction
    assert bm.num_evictions == 1 and a_blocks[1] in c.block_ids
    assert bm.find_cached_prefix(make([1, 2, 3, 4, 9], "x")) == a_blocks[:1]
    assert len(bm.find_cached_prefix(make([6, 7, 8, 9, 10], "y"))) == 2  # b untouched
    bm.check_invariants([c])


def test_a_block_in_use_is_never_evicted():
    bm = BlockManager(num_blocks=5, block_size=2)  # 4 usable blocks
    a = make([1, 2, 3, 4], "a")
    bm.allocate(a, 4)
    a.num_computed_tokens = 4
    bm.cache_full_blocks(a)
    b = make([9, 9, 9, 9], "b")
    assert not bm.can_allocate(b, 6)  # 3 blocks: only 2 free, a's cached blocks are in use
    with pytest.raises(RuntimeError, match="needs 3 KV blocks, 2 free"):
        bm.allocate(b, 6)
    bm.check_invariants([a])


def test_disabled_cache_registers_and_finds_nothing():
    bm = BlockManager(num_blocks=16, block_size=2, enable_prefix_caching=False)
    a = make([1, 2, 3, 4, 5], "a")
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    assert bm.num_cached_blocks == 0 and bm.find_cached_prefix(make([1, 2, 3, 4, 5], "b")) == []


def test_a_recompute_from_a_cache_hit_past_the_prompt_is_an_extend_row():
    """A preempted request that had generated tokens is readmitted with a cached prefix that
    reaches past its prompt; its row brings several tokens, so it is not a decode row (a
    decode kernel or FULL decode graph runs one token per row)."""
    bm = BlockManager(num_blocks=32, block_size=4)
    scheduler = Scheduler(SchedulerConfig(), bm)
    kv = SymbolicKV(bm)
    request = make([1, 2, 3], "a", max_tokens=20)
    scheduler.add(request)
    while request.num_tokens < 15:
        step(scheduler, kv, 9)
    scheduler._preempt(request)
    batch = scheduler.schedule()
    assert batch.prefix_lens == [12] and batch.num_new_tokens == [3]
    assert not batch.is_decode_row(0)
    kv.forward(batch)


def test_two_requests_computing_the_same_prefix_in_one_step_register_it_once():
    bm = BlockManager(num_blocks=32, block_size=4)
    scheduler = Scheduler(SchedulerConfig(), bm)
    kv = SymbolicKV(bm)
    first, second = make(range(1, 11), "first"), make(range(1, 11), "second")
    scheduler.add(first)
    scheduler.add(second)
    batch = scheduler.schedule()  # both admitted before either prefix was computed: no hits
    assert batch.prefix_lens == [0, 0] and first.block_ids[0] != second.block_ids[0]
    kv.forward(batch)
    scheduler.update(batch, [9, 9])
    assert bm.num_cached_blocks == 2  # first's two full blocks; second's stay private
    while scheduler.has_unfinished():
        step(scheduler, kv, 9)
    assert bm.num_evictable_blocks == bm.num_cached_blocks == 3  # + first's decode block
    assert bm.num_free_blocks == bm.num_usable_blocks
    bm.check_invariants([])


def test_a_request_with_a_cached_prefix_gets_its_first_token_in_the_next_step_while_others_decode():
    """The serving case of the shared-prefix benchmark: 31 requests are decoding when one more
    arrives whose long system prompt is cached. It joins the very next step (a mixed batch: no
    prefill-only step, no wait for the decodes) with only its uncached tokens, and samples."""
    bm = BlockManager(num_blocks=2048, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=256), bm)
    kv = SymbolicKV(bm)
    system = list(range(3, 203))  # 200 tokens: 50 full blocks
    decoding = [make(system + [1, i], f"d{i}", max_tokens=50) for i in range(31)]
    for request in decoding:
        scheduler.add(request)
    while any(not r.output_token_ids for r in decoding):  # prefill them all
        step(scheduler, kv, 9)
    arrival = make(system + [2] * 13, "new", max_tokens=4)
    scheduler.add(arrival)
    batch = scheduler.schedule()
    assert arrival in batch.requests
    row = batch.requests.index(arrival)
    assert batch.prefix_lens[row] == 200 and batch.num_new_tokens[row] == 13
    assert batch.samples(row)
    assert sum(batch.is_decode_row(i) for i in range(len(batch.requests))) == 31
    kv.forward(batch)
    scheduler.update(batch, [9] * len(batch.requests))
    assert arrival.output_token_ids == [9]


def test_shared_prefix_serving_shape_admits_arrivals_in_the_next_step():
    """The benchmark's system-prompts workload (8 system prompts of 2,000 tokens, user turns of
    64-192, outputs of 32 or 128, closed loop at concurrency 32, budget 2,048) through the real
    scheduler and block manager: after the first wave, every arrival joins the very next step
    and samples its first token there, and the hit rate is what the prompts allow."""
    rng = random.Random(0)
    system_prompts = [[rng.randrange(256) for _ in range(2000)] for _ in range(8)]
    items = [
        (rng.choice(system_prompts) + [rng.randrange(256)] * rng.choice((64, 128, 192)), out)
        for out in (rng.choice((32, 128)) for _ in range(160))
    ]
    bm = BlockManager(num_blocks=20_000, block_size=16)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=2048), bm)
    arrived, steps_to_first_token, queue = {}, [], list(enumerate(items))
    step = 0

    def submit() -> None:
        index, (prompt, out) = queue.pop(0)
        scheduler.add(make(prompt, f"r{index}", max_tokens=out))
        arrived[f"r{index}"] = step

    for _ in range(32):
        submit()
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        sampled = [9 if batch.samples(i) else None for i in range(len(batch.requests))]
        first = [
            r for r, t in zip(batch.requests, sampled, strict=True) if t and not r.output_token_ids
        ]
        scheduler.update(batch, sampled)
        steps_to_first_token += [step - arrived[r.request_id] + 1 for r in first]
        step += 1
        for _ in scheduler.pop_finished():
            if queue:
                submit()
    later = sorted(steps_to_first_token[32:])  # after the first wave
    assert len(later) == len(items) - 32 and later[int(0.9 * len(later))] == 1
    # Each system prompt is computed once; every other request hits all 125 of its blocks.
    assert bm.stats.hit_tokens >= (len(items) - 8) * 2000
