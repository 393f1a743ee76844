"""Continuous batching with chunked prefill under a per-step token budget. Imports no torch.

Every step, running requests go first (a decode row costs one token, an unfinished prefill
continues with a chunk), then waiting requests are admitted in arrival order while the token
budget, the row limit and the KV pool allow. When the pool runs dry, the newest running request
is preempted: its blocks are freed and it is recomputed from scratch later (preemption by
recompute), so accepted work is never lost.

A step is recorded in two halves, so that the engine can schedule step N+1 before step N's
tokens are known (overlap scheduling): `launched` when its batch is on the device (computed
tokens advance, each sampling row gets an in-flight token), `resolve` when its sampled ids are
on the host (they are appended and stop conditions checked). A request whose in-flight token is
certainly its last (by length) is not scheduled again; one that stops otherwise may have run
one more row, whose token `resolve` discards (its blocks were freed when it finished).

With prefix caching, a request is admitted with the longest cached prefix of its tokens
already computed (shared blocks from the block manager), so only the rest counts against the
token budget; full blocks are registered in the cache after the forward that wrote them
(`launched`), once their token ids are all known on the host (`resolve` registers a block
that an in-flight token completed). A preempted request drops its references, and its blocks stay cached until the pool
needs them, so its recompute usually starts from its own prefix.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from tesela.config import SchedulerConfig
from tesela.engine.block_manager import BlockManager, blocks_for
from tesela.engine.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    """One step's rows: request i computes tokens [prefix_lens[i], prefix_lens[i] + n)."""

    requests: list[Request]
    num_new_tokens: list[int]
    prefix_lens: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, row: int) -> bool:
        """Whether row `row` reaches its newest token and so produces a new one."""
        request = self.requests[row]
        return self.prefix_lens[row] + self.num_new_tokens[row] == request.num_tokens

    def is_decode_row(self, row: int) -> bool:
        # One new token after the prompt. A recompute (after preemption, from a cached prefix
        # or in chunks) can start past the prompt with several tokens: that is an extend row.
        return (
            self.num_new_tokens[row] == 1
            and self.prefix_lens[row] >= self.requests[row].num_prompt_tokens
        )


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, block_manager: BlockManager, max_loras: int = 0
    ) -> None:
        self.config = config
        self.max_loras = max_loras  # distinct adapters among running requests (0: no LoRA)
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._arrivals = itertools.count()
        self.num_preemptions = 0
        self._finished: list[Request] = []

    def add(self, request: Request) -> None:
        self.validate(request)
        request.arrival = next(self._arrivals)
        self.waiting.append(request)

    def validate(self, request: Request) -> None:
        """Refuse up front a request that could never run to its end: nothing is truncated
        later for lack of room (a request admitted here always fits alone in the pool)."""
        n, max_tokens = request.num_prompt_tokens, request.params.max_tokens
        max_model_len = self.config.max_model_len
        if n == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if n >= max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens, but max_model_len is {max_model_len}: "
                "shorten the prompt or raise max_model_len"
            )
        if n + max_tokens > max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens and max_tokens is {max_tokens}: {n + max_tokens} "
                f"tokens exceed max_model_len {max_model_len}; ask for at most "
                f"{max_model_len - n} tokens or shorten the prompt"
            )
        # The last sampled token is never written to the cache.
        self._check_fits_pool(n, n + max_tokens - 1)

    def _check_fits_pool(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        bm = self.block_manager
        capacity = bm.num_usable_blocks * bm.block_size
        if blocks_for(num_cached_tokens, bm.block_size) > bm.num_usable_blocks:
            raise ValueError(
                f"the prompt has {num_prompt_tokens} tokens and the request needs KV slots for "
                f"{num_cached_tokens}, but the KV cache holds only {capacity}: give the cache "
                "more memory (num_kv_tokens, gpu_memory_utilization), lower max_tokens or "
                "shorten the prompt"
            )

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> ScheduledBatch | None:
        budget = self.config.max_num_batched_tokens
        batch = ScheduledBatch([], [], [])
        budget = self._schedule_running(batch, budget)
        self._schedule_waiting(batch, budget)
        return batch if batch.requests else None

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.num_inflight_tokens and request.reaches_length_limit(
                self.config.max_model_len
            ):
                index += 1  # its in-flight token is its last: resolve finishes it
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._reserve(request, n):
                if request not in self.running:  # it was preempted itself
                    continue
                break
            batch.requests.append(request)
            batch.num_new_tokens.append(n)
            batch.prefix_lens.append(request.num_computed_tokens)
            budget -= n
            index += 1
        return budget

    def _reserve(self, request: Request, n: int) -> bool:
        """Get blocks for `n` more tokens of a running request, preempting newer ones."""
        total = request.num_computed_tokens + n
        if blocks_for(total, self.block_manager.block_size) <= len(request.block_ids):
            return True  # its blocks hold them already (most decode steps)
        while not self.block_manager.can_allocate(request, total):
            victim = self.running[-1]
            if victim is request and len(self.running) == 1:
                # Alone and still out of blocks: the pool cannot hold this sequence.
                self.finish(request, "length")
                return False
            self._preempt(victim)
            if victim is request:
                return False
        self.block_manager.allocate(request, total)
        return True

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        block_manager = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if not self._adapter_fits(request):
                break
            if request.num_inflight_tokens:
                break  # preempted with a token in flight: admit it once the id is known
            # A waiting request holds no blocks (new, or preempted and freed): its cached
            # prefix is shared, and only the tokens after it count against the budget.
            cached = block_manager.find_cached_prefix(request)
            num_cached_tokens = len(cached) * block_manager.block_size
            n = min(request.num_tokens - num_cached_tokens, budget)
            if not block_manager.can_allocate(request, num_cached_tokens + n, cached):
                break
            block_manager.allocate(request, num_cached_tokens + n, cached)
            block_manager.record_admission(request, num_cached_tokens)
            request.num_computed_tokens = num_cached_tokens
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.requests.append(request)
            batch.num_new_tokens.append(n)
            batch.prefix_lens.append(request.num_computed_tokens)
            budget -= n

    def _adapter_fits(self, request: Request) -> bool:
        """Running requests may use at most max_loras adapters at once (the device slots), so
        every batch's adapters fit; a request for another adapter waits its turn (FIFO)."""
        if not request.lora_int_id:
            return True
        adapters = {r.lora_int_id for r in self.running if r.lora_int_id}
        return request.lora_int_id in adapters or len(adapters) < self.max_loras

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, batch: ScheduledBatch, sampled: list[int | None]) -> None:
        """Record a step that ran and was read back at once (no overlap)."""
        self.launched(batch)
        self.resolve(batch, sampled)

    def launched(self, batch: ScheduledBatch) -> None:
        """The batch is on the device: computed tokens advance, and every row that samples
        has one token in flight."""
        for row, request in enumerate(batch.requests):
            if request.is_finished:  # aborted before the launch
                continue
            samples = batch.samples(row)
            request.num_computed_tokens += batch.num_new_tokens[row]
            if samples:
                request.num_inflight_tokens += 1
            # The forward wrote these tokens' KV: their full blocks may now be shared.
            self.block_manager.cache_full_blocks(request)

    def resolve(self, batch: ScheduledBatch, sampled: list[int | None]) -> None:
        """The batch's sampled ids are on the host: append them, and finish the requests that
        hit a stop condition (their blocks are freed). A request that finished in the meantime
        (a stop found one step late, an abort) drops its token."""
        for row, request in enumerate(batch.requests):
            token = sampled[row]
            if token is None or request.is_finished:
                continue
            request.num_inflight_tokens -= 1
            request.output_token_ids.append(token)
            # A block completed by a token that was in flight: its ids are all known now.
            self.block_manager.cache_full_blocks(request)
            reason = request.check_token_stop(self.config.max_model_len)
            if reason is not None:
                self.finish(request, reason)

    def finish(self, request: Request, reason: str) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.block_manager.free(request)
        request.finish(reason)
        self._finished.append(request)

    def pop_finished(self) -> list[Request]:
        """Requests finished since the last call, in the order they finished."""
        finished, self._finished = self._finished, []
        return finished

    def abort(self, request_id: str) -> Request | None:
        for request in itertools.chain(self.running, self.waiting):
            if request.request_id == request_id:
                self.finish(request, "abort")
                return request
        return None
