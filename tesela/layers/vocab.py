"""The vocabulary split over tensor-parallel ranks: embedding lookup and LM head.

The vocabulary is padded to a multiple of the group size and rank r holds rows
[r * V/size, (r + 1) * V/size). The embedding looks up the ids that fall in its range (others
read row 0 and are zeroed) and all-reduces, so each id's row comes from exactly one rank. The
LM head computes its rank's logits and all-gathers them along the vocabulary; padded columns
are cut off. A tied LM head shares the embedding's per-rank weight (same rows on each rank).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tesela.distributed.group import SINGLE, TPGroup
from tesela.distributed.sharding import padded_vocab
from tesela.layers.linear import check_shape


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.rows_per_rank = padded_vocab(vocab_size, tp.size) // tp.size
        self.vocab_start = tp.rank * self.rows_per_rank
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        inside = (local >= 0) & (local < self.rows_per_rank)
        hidden = F.embedding(local.masked_fill(~inside, 0), self.weight)
        hidden = hidden.masked_fill(~inside.unsqueeze(-1), 0)
        return self.tp.all_reduce_(hidden)

    def weight_loader(self, param: nn.Parameter, source, shard: str | None, name: str) -> None:
        check_shape(name, source, (self.vocab_size, param.shape[1]))
        end = min(self.vocab_start + self.rows_per_rank, self.vocab_size)
        rows = max(end - self.vocab_start, 0)
        param.data[:rows].copy_(source[self.vocab_start : self.vocab_start + rows])
        param.data[rows:].zero_()  # padding rows: never looked up, their logits are cut off


class ParallelLMHead(VocabParallelEmbedding):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden_states, self.weight)
        if self.tp.size == 1:
            return logits
        return self.tp.all_gather(logits)[..., : self.vocab_size]
