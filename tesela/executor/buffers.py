"""Static input buffers at fixed addresses (every graph runner reads its tokens from them) and
the real batch that warmup and capture run."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tesela.core.forward_batch import ForwardBatch, ForwardMode
from tesela.core.kv_cache import DUMMY_SLOT, RESERVED_BLOCKS


@dataclass
class StaticBuffers:
    """Graph inputs at fixed addresses. A replay of size N reads the first N entries. FULL graphs
    (attention inside) also read each token's KV slot from here."""

    input_ids: torch.Tensor  # [max_tokens] int64
    positions: torch.Tensor  # [max_tokens] int64
    out_cache_loc: torch.Tensor | None = None  # [max_tokens] int64, FULL graphs only

    @classmethod
    def allocate(cls, max_tokens: int, device: torch.device, kv_slots: bool = False):
        zeros = functools.partial(torch.zeros, max_tokens, dtype=torch.int64, device=device)
        slots = torch.full((max_tokens,), DUMMY_SLOT, dtype=torch.int64, device=device)
        return cls(input_ids=zeros(), positions=zeros(), out_cache_loc=slots if kv_slots else None)

    @property
    def max_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def slice(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[:num_tokens], self.positions[:num_tokens]

    def copy_from(self, batch: ForwardBatch, padded_num_tokens: int) -> None:
        """Real tokens first; padding gets token id 0, position 0 and the dummy KV slot, so
        padded tokens never reach a request's cache."""
        n = batch.num_tokens
        self.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        self.positions[:n].copy_(batch.positions, non_blocking=True)
        if self.out_cache_loc is not None:
            self.out_cache_loc[:n].copy_(batch.out_cache_loc, non_blocking=True)
        if padded_num_tokens > n:
            self.input_ids[n:padded_num_tokens].zero_()
            self.positions[n:padded_num_tokens].zero_()
            if self.out_cache_loc is not None:
                self.out_cache_loc[n:padded_num_tokens].fill_(DUMMY_SLOT)


def capture_batch(
    num_tokens: int, block_size: int, device: torch.device, max_row_tokens: int | None = None
) -> ForwardBatch:
    """A real batch of `num_tokens` tokens for warmup and capture, every slot in the reserved
    dummy block, so capture never touches a request's cache: one row, or rows of at most
    `max_row_tokens` tokens where the graph's buffers bound the blocks per row."""
    assert RESERVED_BLOCKS >= 1
    row_tokens = max_row_tokens or num_tokens
    full_rows, rest = divmod(num_tokens, row_tokens)
    lens = [row_tokens] * full_rows + ([rest] if rest else [])
    return ForwardBatch.build(
        token_ids=[[0] * n for n in lens],
        prefix_lens=[0] * len(lens),
        block_tables=[[0] * -(-n // block_size) for n in lens],
        block_size=block_size,
        device=device,
        mode=ForwardMode.EXTEND,
    )
