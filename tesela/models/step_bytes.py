"""The weight bytes one decode step reads: what an HBM floor for that step must count.

A dense model reads every weight once per step, except the embedding table, of which it reads
only the batch's rows. A mixture-of-experts layer reads its router and only the experts its
tokens are routed to: top_k of them at batch 1, up to all of them once the batch touches
them. Benchmarks pass the experts each layer actually used (`record_routed_experts`); without
them the expected count under uniform routing stands in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from tesela.config import ModelConfig


def expected_routed_experts(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Expected distinct experts hit by num_tokens tokens choosing top_k each, uniformly."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


def decode_step_weight_bytes(
    config: ModelConfig,
    batch_size: int,
    itemsize: int,
    routed_experts: Sequence[float] | None = None,
) -> int:
    """Bytes of weights a decode step of `batch_size` tokens reads (through the LM head).

    `routed_experts[j]` is the number of distinct experts the j-th MoE layer used."""
    h, layers = config.hidden_size, config.num_hidden_layers
    attention = h * (config.q_size + 2 * config.kv_size) + config.q_size * h + 2 * h
    attention += 2 * config.head_dim if config.qk_norm else 0
    total = layers * attention + min(batch_size, config.vocab_size) * h + config.vocab_size * h + h
    moe_layers = [i for i in range(layers) if config.is_moe_layer(i)]
    total += (layers - len(moe_layers)) * 3 * h * config.intermediate_size
    if moe_layers:
        moe = config.moe
        if routed_experts is None:
            routed_experts = [expected_routed_experts(moe.num_experts, moe.top_k, batch_size)]
            routed_experts = routed_experts * len(moe_layers)
        if len(routed_experts) != len(moe_layers):
            raise ValueError(
                f"got {len(routed_experts)} expert counts for {len(moe_layers)} MoE layers"
            )
        per_expert = 3 * h * moe.intermediate_size
        total += len(moe_layers) * moe.num_experts * h  # routers
        total += int(sum(routed_experts) * per_expert)
    return total * itemsize


@contextlib.contextmanager
def record_routed_experts(model: nn.Module) -> Iterator[list[int]]:
    """Collects, for each MoE layer run inside the block, the distinct experts it routed to.

    Reads routing results on the host: for benchmarks' eager runs, never inside a graph."""
    from tesela.layers.moe.layer import SparseMoeBlock

    counts: list[int] = []

    def hook(module, args, output) -> None:
        _, ids = module.route(args[0])
        counts.append(int(torch.unique(ids).numel()))

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, SparseMoeBlock)
    ]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()
