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
    # The LoRA part of the batch's plan (tesela.lora.manager.LoRABatchState), when LoRA is on.
    lora: Any = None


_current: ForwardContext | None = None


@contextlib.contextmanager
def forward_context(
    batch: ForwardBatch, attn_backend: AttentionBackend, split_hook: Any = None, lora: Any = None
) -> Iterator[ForwardContext]:
    global _current
    if _current is not None:
        raise RuntimeError(
            f"a forward context is already active for {_current.batch.stamp}; forward passes "
            "must not nest"
        )
    _current = ForwardContext(batch, attn_backend, split_hook, lora)
    try:
        yield _current
    finally:
        _current = None


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError(
            "attention was called outside a forward context: run the model through "
            "ModelRunner.forward (or wrap the call in tesela.executor.forward_context)"
        )
    return _current
