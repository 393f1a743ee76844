"""`moe_align_block_size`: (token, expert) pairs grouped by expert, padded per expert to a block.

The grouped GEMM gives each block of BLOCK_M sorted pairs to one program, and a block must
hold pairs of a single expert, so each expert's pair count is rounded up to BLOCK_M. Everything
is computed on the device with buffers whose sizes depend only on the pair count M*k, E and
BLOCK_M (never on the routing), with no `.item()`, `nonzero` or host sync: the same code runs
inside CUDA graphs and under torch.compile with a symbolic token count.

Pairs whose expert id is outside 0..E-1 (padding tokens) are dropped: they land in
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
    # Out-of-range ids (padding) become expert E, which gets no slot.
    keep = (flat >= 0) & (flat < num_experts)
    if num_valid_tokens is not None:
        token = torch.arange(num_pairs, device=device) // topk_ids.shape[-1]
        keep &= token < num_valid_tokens
    flat = torch.where(keep, flat, num_experts)
    # Rank of each pair among the pairs of its expert, by a running count per expert: no sort
    # (CUB's stable and segmented sorts fail under graph capture for some sizes) and no host
    # sync; [num_pairs, E + 1] int32 is 17 MB at 4096 tokens x top-8 of 128 experts.
    one_hot = torch.zeros(num_pairs, num_experts + 1, dtype=torch.int32, device=device)
    one_hot.scatter_(1, flat[:, None], 1)
    running = torch.cumsum(one_hot, dim=0, dtype=torch.int32)
    rank = running.gather(1, flat[:, None]).squeeze(1) - 1
    counts = running[-1, :num_experts] if num_pairs else one_hot.new_zeros(num_experts)
    padded = (counts + block_size - 1) // block_size * block_size
    padded_end = torch.cumsum(padded, dim=0)
    padded_start = padded_end - padded
    # Dropped pairs all go to one spare slot past the end, sliced off below.
    spare = torch.full((1,), max_padded, dtype=padded_start.dtype, device=device)
    dest = torch.cat([padded_start, spare])[flat] + rank
    dest = torch.where(flat < num_experts, dest, max_padded).to(torch.int64)
    sorted_pair_ids = torch.full((max_padded + 1,), num_pairs, dtype=torch.int32, device=device)
    pair_ids = torch.arange(num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, dest, pair_ids)
    block_starts = torch.arange(0, max_padded, block_size, device=device)
    block_expert_ids = torch.searchsorted(padded_end, block_starts, right=True)
    return AlignedPairs(
        sorted_pair_ids=sorted_pair_ids[:max_padded],
        block_expert_ids=block_expert_ids.to(torch.int32),
        num_padded_pairs=padded_end[-1:].to(torch.int32),
    )
