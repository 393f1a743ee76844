"""Static input buffers shared by every captured size, and the capture batch builder."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tesela.core.forward_batch import ForwardBatch, ForwardMode
from tesela.core.kv_cache import RESERVED_BLOCKS


@dataclass
class StaticBuffers:
    """Graph inputs at fixed addresses. A replay of size N reads the first N entries."""

    input_ids: torch.Tensor  # [max_tokens] int64
    positions: torch.Tensor  # [max_tokens] int64

    @classmethod
    def allocate(cls, max_tokens: int, device: torch.device) -> StaticBuffers:
        return cls(
            input_ids=torch.zeros(max_tokens, dtype=torch.int64, device=device),
            positions=torch.zeros(max_tokens, dtype=torch.int64, device=device),
        )

    @property
    def max_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def slice(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[:num_tokens], self.positions[:num_tokens]

    def copy_from(self, batch: ForwardBatch, padded_num_tokens: int) -> None:
        """Real tokens first; padding gets token id 0 and position 0. Padded tokens never
        reach the KV cache: attention stores and attends the batch's real tokens only."""
        n = batch.num_tokens
        self.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        self.positions[:n].copy_(batch.positions, non_blocking=True)
        if padded_num_tokens > n:
            self.input_ids[n:padded_num_tokens].zero_()
            self.positions[n:padded_num_tokens].zero_()


def capture_batch(
    num_tokens: int, block_size: int, device: torch.device, max_row_tokens: int | None = None
) -> ForwardBatch:
    """A real batch of `num_tokens` tokens for warmup and capture, every slot in the reserved
    dummy block, so capture never touches a request's cache: one row, or rows of at most
    `max_row_tokens` tokens where the graph's buffers bound the blocks per row."""
    assert RESERVED_BLOCKS >= 1
    row_tokens = max_row_tokens or num_tokens
    lens = [row_tokens] * (num_tokens // row_tokens) + [num_tokens % row_tokens] * bool(
        num_tokens % row_tokens
    )
    return ForwardBatch.build(
        token_ids=[[0] * n for n in lens],
        prefix_lens=[0] * len(lens),
        block_tables=[[0] * -(-n // block_size) for n in lens],
        block_size=block_size,
        device=device,
        mode=ForwardMode.EXTEND,
    )
