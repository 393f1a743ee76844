"""The count of a batch's real tokens, on the device, for the MoE layers of padded graphs.

A graph captured for N tokens replays batches of n <= N tokens; tokens n..N-1 are padding.
Their outputs are discarded, so routing them changes nothing, but routed like real tokens they
would pull extra experts' weights through the GEMMs. The MoE layers read this [1] int32 buffer
(its address is fixed, so graphs read the replay's value) and drop pairs of tokens from there
on: they get no slot in the grouped blocks and the per-pair kernel loads nothing for them.

The forward context writes the batch's token count here on entry and INT32_MAX ("all tokens
are real") on exit, outside graph capture. So a run inside a context sees its own batch, and a
graph replayed outside any context masks nothing: a stale count can never drop real tokens.
"""

from __future__ import annotations

import torch

from tesela.core.device import device_key
from tesela.core.forward_context import register_batch_hook

ALL_TOKENS = torch.iinfo(torch.int32).max
_counts: dict[torch.device, torch.Tensor] = {}


def _write_count(num_tokens: int | None) -> None:
    # Never part of a graph: the hook is skipped under CUDA capture, and the CPU stand-in graph
    # (which records ATen ops through a dispatch mode) must not record it either, or replays
    # would rewrite the capture batch's count.
    with torch._C._DisableTorchDispatch():
        for count in _counts.values():
            count.fill_(ALL_TOKENS if num_tokens is None else num_tokens)


def allocate(device: torch.device | str) -> None:
    """Create the buffer for `device` (at model build time, never during capture)."""
    device = device_key(device)
    if not _counts:
        register_batch_hook(_write_count)
    if device not in _counts:
        _counts[device] = torch.full((1,), ALL_TOKENS, dtype=torch.int32, device=device)


def num_valid_tokens(device: torch.device) -> torch.Tensor | None:
    return _counts.get(device_key(device))
