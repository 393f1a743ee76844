"""`moe_align_block_size`: (token, expert) pairs sorted by expert, padded per expert to a block.

The grouped GEMM gives each block of BLOCK_M sorted pairs to one program, and a block must
hold pairs of a single expert, so each expert's pair count is rounded up to BLOCK_M. Everything
is computed on the device with buffers whose sizes depend only on the pair count M*k, E and
BLOCK_M (never on the routing), with no `.item()`, `nonzero` or host sync: the same code runs
inside CUDA graphs and under torch.compile with a symbolic token count.

Pairs whose expert id is outside 0..E-1 (padding tokens) are dropped by the sort: they land in
no block, so they cost no GEMM work and write no output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AlignedPairs:
    # [max_padded] pair index (token * top_k + slot) per sorted slot; num_pairs marks padding.
    sorted_pair_ids: torch.Tensor
    # [max_padded // block_size] expert of each block; num_experts marks a block past the end.
    block_expert_ids: torch.Tensor
    # [1] slots actually used (sum of the padded per-expert counts): later blocks exit early.
    num_padded_pairs: torch.Tensor


def max_padded_pairs(num_pairs: int, num_experts: int, block_size: int) -> int:
    """Worst case of the padded total, rounded up to whole blocks."""
    worst = num_pairs + num_experts * (block_size - 1)
    return -(-worst // block_size) * block_size


def moe_align_block_size(
    topk_ids: torch.Tensor,
    block_size: int,
    num_experts: int,
    num_valid_tokens: torch.Tensor | None = None,
) -> AlignedPairs:
    """`num_valid_tokens` ([1] on the device): tokens from there on are padding, dropped too."""
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = flat.numel()
    max_padded = max_padded_pairs(num_pairs, num_experts, block_size)
    # Out-of-range ids (padding) become expert E, which sorts last and gets no slot.
    keep = (flat >= 0) & (flat < num_experts)
    if num_valid_tokens is not None:
        token = torch.arange(num_pairs, device=device) // topk_ids.shape[-1]
        keep &= token < num_valid_tokens
    flat = torch.where(keep, flat, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts[:num_experts] + block_size - 1) // block_size * block_size
    padded_end = torch.cumsum(padded, dim=0)
    padded_start = padded_end - padded
    unpadded_start = torch.cumsum(counts, dim=0) - counts
    sorted_experts, order = torch.sort(flat, stable=True)
    rank = torch.arange(num_pairs, device=device) - unpadded_start[sorted_experts]
    # Dropped pairs all go to one spare slot past the end, sliced off below.
    spare = torch.full((1,), max_padded, dtype=torch.int64, device=device)
    dest = torch.cat([padded_start, spare])[sorted_experts] + rank
    dest = torch.where(sorted_experts < num_experts, dest, max_padded)
    sorted_pair_ids = torch.full((max_padded + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, max_padded, block_size, device=device)
    block_expert_ids = torch.searchsorted(padded_end, block_starts, right=True)
    return AlignedPairs(
        sorted_pair_ids=sorted_pair_ids[:max_padded],
        block_expert_ids=block_expert_ids.to(torch.int32),
        num_padded_pairs=padded_end[-1:].to(torch.int32),
    )
