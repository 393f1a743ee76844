"""The paged-KV block manager: which blocks of the pool each request owns, and the prefix cache.
Imports no torch.

Blocks are reference counted. Block 0 (and any other reserved block) is never handed out: it
holds the dummy slot that graph padding writes to.

Prefix caching (automatic, in the manner of vLLM's hashed blocks): a *full* block whose KV has
been written by a forward is registered under a hash of everything that determines its KV:
the hash of the block before it (so the whole prefix), its token ids, and the request's extra
keys (its LoRA adapter / namespace and its `cache_salt`). A new request looks its full blocks
up in order at admission and shares the blocks it finds (their reference counts go up), so
their tokens are never recomputed. A block is never written while it is cached: only full,
computed blocks are registered, and a request always computes at least its last token into a
block of its own.

When the last reference to a cached block goes, the block keeps its KV and its hash and waits
in an LRU queue of evictable blocks: a later request can still hit it. Allocation takes
never-cached free blocks first and evicts the least recently released cached block only when
none is left, so the cache costs no capacity: a block in use is never evicted.

Counts: every usable block is exactly one of free (never cached or evicted), evictable (cached,
unreferenced) or used (referenced by at least one request).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from tesela.engine.request import Request

BlockHash = bytes


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def hash_block(parent: BlockHash | None, token_ids: list[int], extra_keys: tuple) -> BlockHash:
    """The identity of a full block: its prefix (through the parent's hash), its tokens and
    the request's extra keys. SHA-256, so that crafted prompts cannot collide with another
    request's prefix and read its KV (Python's tuple hash is not salted)."""
    digest = hashlib.sha256(parent or b"\0")
    digest.update(array("q", token_ids).tobytes())
    digest.update(repr(extra_keys).encode())
    return digest.digest()


@dataclass
class PrefixCacheStats:
    """Prompt tokens looked up at first admission and how many of them were found cached."""

    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        reserved_blocks: int = 1,
        enable_prefix_caching: bool = True,
    ) -> None:
        if num_blocks <= reserved_blocks:
            raise ValueError(f"need more than {reserved_blocks} KV blocks, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.reserved_blocks = reserved_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(reserved_blocks, num_blocks))
        # Cached blocks nobody references, least recently released first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}
        self.stats = PrefixCacheStats()
        self.num_evictions = 0

    # ---- counts ----------------------------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - self.reserved_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: never-cached ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, in use or not."""
        return len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - self.num_free_blocks

    # ---- the prefix cache ------------------------------------------------------------------

    def block_hashes(self, request: Request, num_full_blocks: int) -> list[BlockHash]:
        """The hashes of the request's first `num_full_blocks` full blocks (memoized on the
        request: its tokens never change, only grow)."""
        hashes = request.block_hashes
        if len(hashes) >= num_full_blocks:
            return hashes[:num_full_blocks]
        size = self.block_size
        extra = request.extra_keys
        while len(hashes) < num_full_blocks:
            start = len(hashes) * size
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, request.token_ids(start, start + size), extra))
        return hashes[:num_full_blocks]

    def find_cached_prefix(self, request: Request) -> list[int]:
        """The cached blocks that hold the longest cached prefix of the request's tokens. At
        least the last token is left out: it must run to give logits, and its block must be the
        request's own because a cached block is never written."""
        if not self.enable_prefix_caching:
            return []
        hit: list[int] = []
        for block_hash in self.block_hashes(request, (request.num_tokens - 1) // self.block_size):
            block = self._cached.get(block_hash)
            if block is None:
                break
            hit.append(block)
        return hit

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's full blocks whose KV a forward has written (all tokens below
        `num_computed_tokens`). A block whose hash is already cached under another block (two
        requests computed the same prefix in one step) stays private: the first one wins."""
        if (
            not self.enable_prefix_caching
            or request.num_computed_tokens // self.block_size <= request.num_registered_blocks
        ):
            return  # (the usual case: no block completed since the last call)
        # Only tokens whose ids the host knows can be hashed (not one in flight: overlap).
        known = min(request.num_computed_tokens, request.num_tokens - request.num_inflight_tokens)
        num_full = min(known // self.block_size, len(request.block_ids))
        if num_full <= request.num_registered_blocks:
            return
        hashes = self.block_hashes(request, num_full)
        for index in range(request.num_registered_blocks, num_full):
            block = request.block_ids[index]
            if hashes[index] not in self._cached and self._block_hashes[block] is None:
                self._cached[hashes[index]] = block
                self._block_hashes[block] = hashes[index]
        request.num_registered_blocks = num_full

    # ---- allocation ------------------------------------------------------------------------

    def blocks_needed(
        self, request: Request, num_tokens: int, cached_blocks: Sequence[int] = ()
    ) -> int:
        """Blocks `request` must take from the free pool so that its first `num_tokens` tokens
        have slots, given that it starts with `cached_blocks` (when it holds none yet): new
        blocks, plus the cached ones that nobody references (they leave the evictable pool)."""
        held = len(request.block_ids) + len(cached_blocks)
        revived = sum(1 for b in cached_blocks if self._ref_counts[b] == 0)
        return max(0, blocks_for(num_tokens, self.block_size) - held) + revived

    def can_allocate(
        self, request: Request, num_tokens: int, cached_blocks: Sequence[int] = ()
    ) -> bool:
        return self.blocks_needed(request, num_tokens, cached_blocks) <= self.num_free_blocks

    def allocate(
        self, request: Request, num_tokens: int, cached_blocks: Sequence[int] = ()
    ) -> None:
        """Give `request` slots for its first `num_tokens` tokens. `cached_blocks` (from
        `find_cached_prefix`, only for a request that holds no blocks) become its first blocks."""
        needed = self.blocks_needed(request, num_tokens, cached_blocks)
        if needed > self.num_free_blocks:
            raise RuntimeError(
                f"request {request.request_id} needs {needed} KV blocks, {self.num_free_blocks} free"
            )
        if cached_blocks:
            assert not request.block_ids, "cached blocks start a request's block table"
            for block in cached_blocks:
                if self._ref_counts[block] == 0:
                    del self._evictable[block]
                self._ref_counts[block] += 1
            request.block_ids = list(cached_blocks)
            request.num_registered_blocks = len(cached_blocks)
        for _ in range(blocks_for(num_tokens, self.block_size) - len(request.block_ids)):
            block = self._take_free_block()
            self._ref_counts[block] = 1
            request.block_ids.append(block)

    def _take_free_block(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:  # evict the least recently released cached block
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._block_hashes[block]]
            self._block_hashes[block] = None
            self.num_evictions += 1
        assert self._ref_counts[block] == 0, f"block {block} handed out twice"
        return block

    def free(self, request: Request) -> None:
        """Drop the request's references. Cached blocks keep their KV (evictable, most recently
        released last); the rest return to the free pool. Freed in reverse, so that a request's
        tail blocks are evicted before the prefix blocks that more requests share."""
        for block in reversed(request.block_ids):
            self._ref_counts[block] -= 1
            assert self._ref_counts[block] >= 0, f"block {block} freed twice"
            if self._ref_counts[block] == 0:
                if self._block_hashes[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        request.block_ids = []
        request.num_registered_blocks = 0

    def record_admission(self, request: Request, num_cached_tokens: int) -> None:
        """Count a request's first admission in the hit rate (a recompute after preemption
        hitting its own blocks is not a hit the user sees)."""
        if request.num_cached_tokens is None:
            request.num_cached_tokens = num_cached_tokens
            if self.enable_prefix_caching:
                self.stats.queried_tokens += request.num_prompt_tokens
                self.stats.hit_tokens += num_cached_tokens

    def slot(self, request: Request, position: int) -> int:
        block = request.block_ids[position // self.block_size]
        return block * self.block_size + position % self.block_size

    def check_invariants(self, requests: list[Request]) -> None:
        """Internal consistency, for tests: reference counts match the block tables of
        `requests` (every request holding blocks), the pools partition the usable blocks, and
        the hash table and the per-block hashes agree."""
        counts = [0] * self.num_blocks
        for request in requests:
            for block in request.block_ids:
                counts[block] += 1
        assert counts == self._ref_counts, "reference counts differ from the block tables"
        free, evictable = set(self._free), set(self._evictable)
        used = {b for b in range(self.num_blocks) if self._ref_counts[b] > 0}
        assert not (free & evictable) and not (free & used) and not (evictable & used)
        assert len(free) + len(evictable) + len(used) == self.num_usable_blocks
        assert all(b >= self.reserved_blocks for b in free | evictable | used)
        for block_hash, block in self._cached.items():
            assert self._block_hashes[block] == block_hash, f"block {block} hash mismatch"
        assert sum(h is not None for h in self._block_hashes) == len(self._cached)
        assert all(self._block_hashes[b] is not None for b in evictable)
        assert all(self._block_hashes[b] is None for b in free)
