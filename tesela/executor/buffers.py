"""Static input buffers at fixed addresses (every graph runner reads its tokens from them) and
the real batch that warmup and capture run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tesela.core.forward_batch import ForwardBatch, ForwardMode
from tesela.core.kv_cache import DUMMY_SLOT, RESERVED_BLOCKS


@dataclass
class StaticBuffers:
    """Graph inputs at fixed addresses: each token's id, position and KV slot (a graph that
    stores K/V, attention inside a FULL graph or the rotary kernel inside a piece, reads the
    slots from here). A replay of size N reads the first N entries. The inputs are the rows of
    one tensor, as a built ForwardBatch's are (`ForwardBatch.token_rows`), so a replay copies
    them in one op and pads them in another."""

    rows: torch.Tensor  # [3, max_tokens] int64: input ids, positions, KV slots
    padding: torch.Tensor  # [3, 1] int64: what padding tokens read (token 0, position 0, the
    # dummy KV slot)

    @classmethod
    def allocate(cls, max_tokens: int, device: torch.device):
        padding = torch.tensor([0, 0, DUMMY_SLOT], dtype=torch.int64, device=device).view(-1, 1)
        return cls(rows=padding.expand(-1, max_tokens).clone(), padding=padding)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.rows[0]

    @property
    def positions(self) -> torch.Tensor:
        return self.rows[1]

    @property
    def out_cache_loc(self) -> torch.Tensor:
        return self.rows[2]

    @property
    def max_tokens(self) -> int:
        return int(self.rows.shape[1])

    def slice(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[:num_tokens], self.positions[:num_tokens]

    def copy_from(self, batch: ForwardBatch, padded_num_tokens: int) -> None:
        """Real tokens first; padding gets token id 0, position 0 and the dummy KV slot, so
        padded tokens never reach a request's cache."""
        n = batch.num_tokens
        self.rows[:, :n].copy_(batch.token_rows, non_blocking=True)
        if padded_num_tokens > n:
            self.rows[:, n:padded_num_tokens].copy_(
                self.padding.expand(-1, padded_num_tokens - n), non_blocking=True
            )

    def view_batch(self, batch: ForwardBatch) -> ForwardBatch:
        """`batch` copied in, as the same batch with these buffers for token tensors: what a
        graph captured over it reads (warmup and capture run such batches; a kernel that stores
        K/V before attention captures their slots from here)."""
        size = batch.num_tokens
        self.copy_from(batch, size)
        return dataclasses.replace(
            batch,
            input_ids=self.input_ids[:size],
            positions=self.positions[:size],
            out_cache_loc=self.out_cache_loc[:size],
            token_rows=self.rows[:, :size],
        )


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
