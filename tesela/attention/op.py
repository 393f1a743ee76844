"""The attention split op: `torch.ops.tesela.attention`.

A registered custom op that writes into a caller-provided output and reads its per-batch state
from the forward context. Graph code treats it as opaque: the breakable runner ends a graph
segment at it, the compiled runner splits the FX graph at it.

The breakable runner does not replay the op itself: `SPLIT_BINDINGS` gives it, per split
function, a `bind` (run once per recorded call: the backend's per-layer callable over the
captured tensors) and a `prepare` (run once per replay: the plan check and the launch values
every layer shares), so a replayed split call does no op dispatch, context lookup or slicing.
"""

from __future__ import annotations

import torch

from tesela.attention.base import AttentionBackend, SplitReplay
from tesela.core.forward_context import ForwardContext, get_forward_context
from tesela.core.kv_cache import KVStoreTarget


def run_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    layer_id: int,
    kv_stored: bool = False,
) -> None:
    """Attention for the batch in the current forward context.

    The tensors may be longer than the batch (padded to a captured size): only the batch's
    real tokens are attended and stored, so padding never reaches the KV cache. With
    `kv_stored` the rotary kernel already stored K/V (at `kv_store_target`: a graph's padding
    tokens went to the dummy slot).
    """
    context = get_forward_context()
    batch, plan = context.batch, context.plan
    context.check_plan("attention")  # the metadata invariant: planned for this very batch
    n = batch.num_tokens
    if q.shape[0] < n:
        raise RuntimeError(f"attention got {q.shape[0]} tokens for {batch.stamp}")
    context.attn_backend.forward(
        q[:n], k[:n], v[:n], out[:n], layer_id, batch, plan.attn_metadata, kv_stored
    )


def kv_store_target(layer_id: int) -> KVStoreTarget | None:
    """Where a layer's rotary kernel may store its new K/V in the current forward (None: the
    attention call stores them): the backend's choice, for the batch the forward runs, whose
    slots a graph captures from its static buffers. Not under torch.compile: a trace records
    attention with its own store."""
    if torch.compiler.is_compiling():
        return None
    context = get_forward_context()
    return context.attn_backend.kv_store_target(layer_id, context.batch)


def prepare_attention_replay(context: ForwardContext) -> SplitReplay:
    """Once per breakable replay, for every layer's bound attention call: the metadata
    invariant (the same check `run_attention` makes per call) and the shared launch values."""
    batch, plan = context.batch, context.plan
    context.check_plan("attention")
    return context.attn_backend.prepare_split_replay(batch, plan.attn_metadata)


def bind_attention(
    backend: AttentionBackend,
    tensors: tuple[torch.Tensor, ...],
    layer_id: int,
    kv_stored: bool = False,
):
    """The recorded call `run_attention(q, k, v, out, layer_id, kv_stored)` bound to its
    tensors."""
    q, k, v, out = tensors
    return backend.bind_split(q, k, v, out, layer_id, kv_stored)


# split function -> (prepare once per replay, bind once per recorded call)
SPLIT_BINDINGS = {run_attention: (prepare_attention_replay, bind_attention)}


@torch.library.custom_op("tesela::attention", mutates_args=("out",))
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    layer_id: int,
    kv_stored: bool = False,
) -> None:
    context = get_forward_context()
    if context.split_hook is not None:
        # Breakable capture: the hook closes the graph segment, runs this call eagerly and
        # records it so that replay can run it again with the replay batch's metadata.
        context.split_hook(run_attention, (q, k, v, out), layer_id, kv_stored)
        return
    run_attention(q, k, v, out, layer_id, kv_stored)


@attention.register_fake
def _(q, k, v, out, layer_id, kv_stored=False) -> None:
    return None


SPLIT_OPS = (torch.ops.tesela.attention.default,)
