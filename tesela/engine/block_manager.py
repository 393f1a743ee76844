"""The paged-KV block manager: which blocks of the pool each request owns. Imports no torch.

Blocks are reference counted so that prefix sharing can later hand one block to several
requests; today every block has one owner. Block 0 (and any other reserved block) is never
handed out: it holds the dummy slot that graph padding writes to.
"""

from __future__ import annotations

from collections import deque

from tesela.engine.request import Request


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, reserved_blocks: int = 1) -> None:
        if num_blocks <= reserved_blocks:
            raise ValueError(f"need more than {reserved_blocks} KV blocks, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.reserved_blocks = reserved_blocks
        self._free: deque[int] = deque(range(reserved_blocks, num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - self.reserved_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - self.num_free_blocks

    def blocks_needed(self, request: Request, num_tokens: int) -> int:
        """Extra blocks `request` needs so that its first `num_tokens` tokens have slots."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(request.block_ids))

    def can_allocate(self, request: Request, num_tokens: int) -> bool:
        return self.blocks_needed(request, num_tokens) <= self.num_free_blocks

    def allocate(self, request: Request, num_tokens: int) -> None:
        needed = self.blocks_needed(request, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(
                f"request {request.request_id} needs {needed} KV blocks, {self.num_free_blocks} free"
            )
        for _ in range(needed):
            block = self._free.popleft()
            assert self._ref_counts[block] == 0, f"block {block} handed out twice"
            self._ref_counts[block] = 1
            request.block_ids.append(block)

    def free(self, request: Request) -> None:
        # Free in reverse so the tail blocks (least likely shared later) are reused first.
        for block in reversed(request.block_ids):
            self._ref_counts[block] -= 1
            assert self._ref_counts[block] >= 0, f"block {block} freed twice"
            if self._ref_counts[block] == 0:
                self._free.append(block)
        request.block_ids = []

    def slot(self, request: Request, position: int) -> int:
        block = request.block_ids[position // self.block_size]
        return block * self.block_size + position % self.block_size
