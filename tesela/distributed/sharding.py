"""Which part of each tensor a tensor-parallel rank holds.

A weight is a stack of *sections* (q, k and v of a fused qkv projection; gate and up of the
MLP), each a run of equal *units* (a head of `head_dim` rows, or single rows). A section splits
by units: with at least as many units as ranks each rank takes a contiguous 1/size of them;
with fewer (KV heads when tp exceeds their count) each unit is replicated over size/units
consecutive ranks, so rank r holds unit r // (size / units) — the KV head its query heads use
under grouped-query attention. `check_tp_shapes` turns a shape that cannot split into a user
error before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    num_units: int
    unit_size: int = 1

    @property
    def rows(self) -> int:
        return self.num_units * self.unit_size

    def rank_units(self, rank: int, size: int) -> tuple[int, int]:
        """(first unit, number of units) that `rank` of `size` holds."""
        if self.num_units >= size:
            assert self.num_units % size == 0, (self.num_units, size)
            count = self.num_units // size
            return rank * count, count
        assert size % self.num_units == 0, (self.num_units, size)
        return rank // (size // self.num_units), 1

    def rank_rows(self, rank: int, size: int) -> tuple[int, int]:
        """(first row, number of rows) of the full section that `rank` holds."""
        first, count = self.rank_units(rank, size)
        return first * self.unit_size, count * self.unit_size


def padded_vocab(vocab_size: int, size: int) -> int:
    """The vocabulary rounded up so every rank holds the same number of rows."""
    return -(-vocab_size // size) * size


def check_tp_shapes(
    *,
    num_attention_heads: int,
    num_key_value_heads: int,
    intermediate_size: int,
    tensor_parallel_size: int,
) -> None:
    """Raise a ValueError saying what to change when the model cannot split over `size`."""
    size = tensor_parallel_size
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    if num_attention_heads % size:
        raise ValueError(
            f"tensor_parallel_size {size} does not divide the model's {num_attention_heads} "
            "attention heads: pick a divisor of the head count"
        )
    kv = num_key_value_heads
    if (kv >= size and kv % size) or (kv < size and size % kv):
        raise ValueError(
            f"tensor_parallel_size {size} and the model's {kv} KV heads do not split evenly: "
            "the size must divide the KV head count or be a multiple of it"
        )
    if intermediate_size % size:
        raise ValueError(
            f"tensor_parallel_size {size} does not divide intermediate_size "
            f"{intermediate_size}: pick a divisor"
        )
