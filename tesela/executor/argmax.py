"""The first maximum of every row of a batch of logits, in one launch.

Greedy sampling ends every decode step with an argmax over the vocabulary. PyTorch's
`argmax(dim=-1)` costs a batch-1 step three kernels once the tokens must land in a buffer of
their own (a memset, its reduction kernel of about 9 us over 152k logits on an H200, then the
copy into the buffer the next step's fed ids come from). `argmax_rows(logits, out=out)` is one
kernel that writes the tokens straight into `out`:

- every program reduces one BLOCK of one row to a single 64-bit key that orders (value, column)
  as the argmax does: the value's bits made order-preserving as a signed int in the high half,
  the column's complement in the low half, so the larger value wins and, among equal values,
  the first column (torch's tie rule);
- it folds that key into the row's slot with an atomic max, then takes a ticket; the program
  that draws the row's last ticket reads the slot back (resetting it), decodes the column into
  `out` and resets the ticket counter. The scratch slots are the same at the end of a launch as
  at its start, so a CUDA graph replays the kernel as often as it likes.

A row's result depends on its own logits only, so it is the same in any batch, eager or in a
graph, and equal to `torch.argmax` (tests/test_argmax.py checks ties, -inf and rows wider than
one block; positive NaN ranks above +inf as in torch).

The scratch (two words per row, tesela/core/scratch.py) lives per device and only grows: a
buffer that a captured graph reads is never freed, and none is allocated while a stream
captures (the runners sample once before they capture, which sizes it). Launches on one device
share it, so they must run on one stream, as the engine's sampling does.
"""

from __future__ import annotations

import torch

from tesela.attention.triton_kernels.launcher import (
    CachedLauncher,
    constexpr_args,
    runtime_args,
)
from tesela.core.intmath import cdiv
from tesela.core.pdl import grid_dependency_sync
from tesela.core.scratch import DeviceScratch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU without triton: torch's argmax serves
    triton = None

BLOCK = 4096  # logits per program: 38 programs over a 152k vocabulary at batch 1
OPTIONS = (4, 1)  # (num_warps, num_stages): one load per program, nothing to pipeline
_EMPTY = -(2**63)  # a slot holding no key yet (below every key; the kernel's reset value)


def argmax_rows(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The first maximum's column of every row of `logits` [rows, vocab] (int64), written into
    `out` when given. One Triton launch on CUDA, torch's argmax elsewhere."""
    if logits.device.type == "cuda" and triton is not None:
        return argmax_kernel(logits, out)
    tokens = logits.argmax(dim=-1)
    return tokens if out is None else out.copy_(tokens)


if triton is not None:

    @triton.jit
    def _argmax_kernel(
        logits_ptr,
        stride_row,
        out_ptr,
        slot_ptr,
        ticket_ptr,
        vocab,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):
        grid_dependency_sync(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(
            logits_ptr + row * stride_row + cols, mask=cols < vocab, other=float("-inf")
        ).to(tl.float32)
        bits = x.to(tl.int32, bitcast=True)
        # Negative floats order backwards as ints: flipping their magnitude bits fixes that.
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        low = 4294967295 - cols.to(tl.int64)  # the first column has the largest complement
        key = tl.max((ordered.to(tl.int64) << 32) | low, axis=0)
        tl.atomic_max(slot_ptr + row, key)
        ticket = tl.atomic_add(ticket_ptr + row, 1)
        if ticket == tl.num_programs(1) - 1:  # every program of the row has folded its key in
            best = tl.atomic_xchg(slot_ptr + row, -9223372036854775808)  # back to _EMPTY
            tl.store(out_ptr + row, 4294967295 - (best & 4294967295))
            tl.store(ticket_ptr + row, 0)

    _ARGMAX = CachedLauncher(_argmax_kernel)


# Per row: the best key folded in so far (empty between launches) and the ticket counter.
_SLOTS = DeviceScratch("argmax key", torch.int64, _EMPTY)
_TICKETS = DeviceScratch("argmax ticket", torch.int32, 0)


def argmax_kernel(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`argmax_rows` by the Triton kernel on any device (CPU tensors under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("argmax_kernel needs triton (argmax_rows falls back to torch)")
    if logits.dim() != 2:
        raise ValueError(f"argmax_rows takes [rows, vocab] logits, got {tuple(logits.shape)}")
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    elif out.shape != (rows,) or out.dtype != torch.int64 or not out.is_contiguous():
        raise ValueError(
            f"argmax_rows writes int64 [{rows}] tokens: got out {out.dtype} {tuple(out.shape)}"
        )
    if rows == 0:
        return out
    slots, tickets = _SLOTS.get(logits.device, rows), _TICKETS.get(logits.device, rows)
    _ARGMAX(
        (rows, cdiv(vocab, BLOCK), 1),
        OPTIONS,
        runtime_args(logits, logits.stride(0), out, slots, tickets, vocab),
        constexpr_args(BLOCK),
        num_tokens=rows,
    )
    return out
