"""The scoped forward context: the batch being run, its plan, and the attention backend.

Model code stays ordinary PyTorch (`forward(input_ids, positions)`); the attention split op
finds the batch, its plan and the backend here. The context is set by a context manager that
refuses nesting and always restores, so a stale batch can never leak into a later pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tesela.core.forward_batch import ForwardBatch
from tesela.core.plan import AttentionMetadata, ForwardPlan


class AttentionImpl(Protocol):
    """What the split op calls: an attention backend (tesela/attention/base.py)."""

    name: str

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        layer_id: int,
        batch: ForwardBatch,
        metadata: AttentionMetadata,
        kv_stored: bool = False,
    ) -> None: ...


@dataclass
class ForwardContext:
    batch: ForwardBatch
    plan: ForwardPlan
    attn_backend: AttentionImpl
    # Set by the breakable piecewise runner while it captures: every split op hands itself to
    # this hook, which ends the current graph segment, runs the op eagerly and records it.
    # Called as split_hook(fn, tensors, *args) in place of fn(*tensors, *args).
    split_hook: Callable[..., None] | None = None
    # Set inside `batch_state(n, plan)` (a FULL graph replay): the replayed batch's plan, whose
    # persistent buffers the CPU stand-in's re-run of the captured forward reads.
    replayed: ForwardPlan | None = None

    def check_plan(self, where: str) -> None:
        """The metadata invariant, where a split op or a plan-reading op runs."""
        self.plan.check(self.batch, where, self.replayed)


_current: ForwardContext | None = None
# Per-batch device state that ordinary (non-split) ops read, e.g. the MoE layers' count of real
# tokens (tesela/layers/moe/padding.py): called with the token count on entry, None on exit.
_batch_hooks: list[Callable[[int | None], None]] = []


# Set by `batch_state` around a graph replay: forward contexts entered inside it (the CPU
# stand-in graph re-running its captured callable) see the replayed batch's count and plan, as
# on a GPU.
_pinned_num_tokens: int | None = None
_pinned_plan: ForwardPlan | None = None


def register_batch_hook(hook: Callable[[int | None], None]) -> None:
    _batch_hooks.append(hook)


def _run_batch_hooks(num_tokens: int | None) -> None:
    # During capture the write would be recorded and replayed with the capture batch's count:
    # the replay's own context entry writes the right one instead.
    if _batch_hooks and not (
        torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    ):
        for hook in _batch_hooks:
            hook(num_tokens)


@contextlib.contextmanager
def batch_state(num_tokens: int, plan: ForwardPlan | None = None) -> Iterator[None]:
    """The per-batch device state of a forward context, for a graph replayed outside one (FULL
    graphs replay with no Python): written before, reset after. `plan` is the replayed batch's
    (checked by the runner before the replay), which a captured forward re-run on CPU checks
    its persistent buffers against (`ForwardPlan.check`)."""
    global _pinned_num_tokens, _pinned_plan
    _pinned_num_tokens, _pinned_plan = num_tokens, plan
    _run_batch_hooks(num_tokens)
    try:
        yield
    finally:
        _pinned_num_tokens, _pinned_plan = None, None
        _run_batch_hooks(None)


@contextlib.contextmanager
def forward_context(
    batch: ForwardBatch, plan: ForwardPlan, attn_backend: AttentionImpl, split_hook: Any = None
) -> Iterator[ForwardContext]:
    global _current
    if _current is not None:
        raise RuntimeError(
            f"a forward context is already active for {_current.batch.stamp}; forward passes "
            "must not nest"
        )
    _current = ForwardContext(batch, plan, attn_backend, split_hook, _pinned_plan)
    pinned = _pinned_num_tokens
    _run_batch_hooks(batch.num_tokens if pinned is None else pinned)
    try:
        yield _current
    finally:
        _current = None
        _run_batch_hooks(pinned)


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError(
            "attention was called outside a forward context: run the model through a runner "
            "(tesela/executor) or wrap the call in tesela.core.forward_context.forward_context"
        )
    return _current
