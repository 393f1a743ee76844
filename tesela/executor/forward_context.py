"""The scoped forward context: what the attention split op reads for the batch being run.

Model code stays ordinary PyTorch (`forward(input_ids, positions)`); the split op finds the
batch, the attention backend and the KV pool here. The context is set by a context manager
that refuses nesting and always restores, so a stale batch can never leak into a later pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tesela.attention.base import AttentionBackend
    from tesela.executor.forward_batch import ForwardBatch


@dataclass
class ForwardContext:
    batch: ForwardBatch
    attn_backend: AttentionBackend
    # Set by the breakable piecewise runner while it captures: every split op hands itself to
    # this hook, which ends the current graph segment, runs the op eagerly and records it.
    # Called as split_hook(fn, tensors, *args) in place of fn(*tensors, *args).
    split_hook: Callable[..., None] | None = None


_current: ForwardContext | None = None
# Per-batch device state that ordinary (non-split) ops read, e.g. the MoE layers' count of real
# tokens (tesela/layers/moe/padding.py): called with the token count on entry, None on exit.
_batch_hooks: list[Callable[[int | None], None]] = []


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
def forward_context(
    batch: ForwardBatch, attn_backend: AttentionBackend, split_hook: Any = None
) -> Iterator[ForwardContext]:
    global _current
    if _current is not None:
        raise RuntimeError(
            f"a forward context is already active for {_current.batch.stamp}; forward passes "
            "must not nest"
        )
    _current = ForwardContext(batch, attn_backend, split_hook)
    _run_batch_hooks(batch.num_tokens)
    try:
        yield _current
    finally:
        _current = None
        _run_batch_hooks(None)


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError(
            "attention was called outside a forward context: run the model through "
            "ModelRunner.forward (or wrap the call in tesela.executor.forward_context)"
        )
    return _current
