"""Top-k expert selection: router logits -> (topk_weights, topk_ids) per token.

Each architecture has its own rule (see `MoeConfig.scoring`), reproduced here with the same
dtypes as transformers so greedy outputs match: Qwen3-MoE rounds the weights back to the
activation dtype, Mixtral keeps them in fp32.

`select_experts` is the rule in torch ops (softmax, topk, sum, div, cast: five launches);
`tesela::moe_topk` is the same rule in one Triton launch (`router_topk_kernel`, one program per
token), which the MoE layer uses wherever the experts run as Triton.

Ties: the kernel gives equal probabilities to the lowest expert index first (a fixed rule);
torch.topk promises no order. fp32 logits almost never tie; bf16
logits tie often. A tie inside the top k only swaps two slots (the same experts, the same sum);
a tie at the k-th place picks the lower index, as torch.topk's CUDA selection does in practice
(its CPU path and the order it sorts tied outputs in may differ).

At decode the router GEMM is folded in too: `tesela::moe_router` takes the hidden states and
the gate weight and returns (topk_weights, topk_ids) in one launch (`router_gemm_topk_kernel`).
One program per token would stream the whole [E, H] gate weight alone (512 KB for
qwen3-30b-a3b, several microseconds on one SM at batch 1), so the GEMM is split over programs
(e-block, token), each streaming BLOCK_E rows, and no second launch runs the top-k: each
program takes a ticket on its token's counter, and the one that draws the last ticket runs the
rule on the token's E logits (a "last program finishes" reduction, as split-K GEMMs use).
The logits are rounded to the activation dtype as the gate Linear's output is, and each is an
fp32 sum in a fixed order, so nothing depends on the order programs run in. The rule is
`moe_topk`'s own code (`_route_token` in kernels.py); run with more warps its fp32 sums may
reduce in another order, so on the GPU the weights agree with `moe_topk`'s to fp32 rounding.

The counters and the scratch logits are a per-device `RouterWorkspace`, allocated zeroed at
model build (never during graph capture: graphs keep their addresses) for up to
`MAX_FUSED_ROUTER_TOKENS` tokens. The last program puts its counter back to zero, so the next
layer and the next replay start from zero; launches share the workspace, so they must run in
stream order (one forward at a time per device). Above that token count (prefill, where cuBLAS
wins), or without a workspace for the device, the op runs `gemv.linear` then `moe_topk`; the
choice is made inside the op at run time, so a trace never guards on the token count.
"""

from __future__ import annotations

import dataclasses

import torch

from tesela.core.device import device_key
from tesela.core.intmath import cdiv, next_power_of_2
from tesela.core.pdl import launch_kwargs
from tesela.layers import gemv

SCORINGS = ("softmax_topk", "topk_softmax")
# One program holds a token's E probabilities in registers: up to here one block fits well.
MAX_FUSED_EXPERTS = 1024
# Decode batches: the scratch holds this many tokens' logits; larger batches run the GEMM apart.
MAX_FUSED_ROUTER_TOKENS = 64
# Tiles of the fused router GEMM, from an H200 sweep at batch 1 (qwen3-30b-a3b, E=128, H=2048,
# 256 gates per CUDA graph so each arrives cold): BLOCK_E=2 gives 64 programs per token, each
# streaming 8 KB in one [2, 2048] step, 5.7 us per router against 8.5 us for [8, 1024] tiles
# and 5.8 us for the GEMV + moe_topk pair. The hook for a tuner: make this a function of
# (device, E, H, M bucket), as gemv_table.json is for the linear layers.
ROUTER_GEMM_CONFIG = {"BLOCK_E": 2, "BLOCK_H": 2048, "num_warps": 8}


def select_experts(
    router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns weights [M, top_k] and expert ids [M, top_k] (int64), best expert first."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if scoring == "topk_softmax":
        # softmax over the k best logits == the top-k of the full softmax, renormalised.
        return weights / weights.sum(dim=-1, keepdim=True), ids
    if scoring != "softmax_topk":
        raise ValueError(f"unknown MoE router scoring {scoring!r}")
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def _weights_dtype(router_logits: torch.Tensor, scoring: str) -> torch.dtype:
    return torch.float32 if scoring == "topk_softmax" else router_logits.dtype


def _check_rule(scoring: str, top_k: int, num_experts: int) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"unknown MoE router scoring {scoring!r}: expected one of {SCORINGS}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and the {num_experts} experts")


@torch.library.custom_op("tesela::moe_topk", mutates_args=())
def fused_select_experts(
    router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`select_experts` in one Triton launch (same contract, same output dtypes)."""
    from tesela.layers.moe import kernels

    num_tokens, num_experts = router_logits.shape
    _check_rule(scoring, top_k, num_experts)
    router_logits = router_logits.contiguous()
    weights = router_logits.new_empty(
        num_tokens, top_k, dtype=_weights_dtype(router_logits, scoring)
    )
    ids = router_logits.new_empty(num_tokens, top_k, dtype=torch.int64)
    if num_tokens == 0:
        return weights, ids
    block_e = next_power_of_2(num_experts)
    kernels.router_topk_kernel[(num_tokens,)](
        router_logits, weights, ids, num_experts, router_logits.stride(0),
        TOP_K=top_k, RENORMALIZE=renormalize or scoring == "topk_softmax",
        BLOCK_E=block_e, BLOCK_TOPK=next_power_of_2(top_k),
        # Up to 256 experts one warp holds the row: the 2k reductions stay in shuffles.
        num_warps=1 if block_e <= 256 else 4, **launch_kwargs(router_logits.device, num_tokens),
    )  # fmt: skip
    return weights, ids


@fused_select_experts.register_fake
def _(router_logits, top_k, scoring, renormalize):
    shape = (router_logits.shape[0], top_k)
    return (
        router_logits.new_empty(shape, dtype=_weights_dtype(router_logits, scoring)),
        router_logits.new_empty(shape, dtype=torch.int64),
    )


@dataclasses.dataclass(frozen=True)
class RouterWorkspace:
    """Persistent buffers of the fused router kernel on one device (fixed addresses, so CUDA
    graphs can replay them): fp32 logits for up to MAX_FUSED_ROUTER_TOKENS x MAX_FUSED_EXPERTS,
    and one int32 ticket counter per token, zero between launches."""

    logits: torch.Tensor
    counters: torch.Tensor


_workspaces: dict[torch.device, RouterWorkspace] = {}


def allocate_workspace(device: torch.device | str) -> None:
    """Create `device`'s workspace (at model build time, never during graph capture)."""
    key = device_key(device)
    if key not in _workspaces:
        _workspaces[key] = RouterWorkspace(
            logits=torch.zeros(MAX_FUSED_ROUTER_TOKENS * MAX_FUSED_EXPERTS, device=key),
            counters=torch.zeros(MAX_FUSED_ROUTER_TOKENS, dtype=torch.int32, device=key),
        )


def workspace(device: torch.device) -> RouterWorkspace | None:
    return _workspaces.get(device_key(device))


@torch.library.custom_op("tesela::moe_router", mutates_args=())
def fused_router(
    hidden_states: torch.Tensor,
    gate_weight: torch.Tensor,
    top_k: int,
    scoring: str,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe_topk(gemv.linear(hidden_states, gate_weight, None), ...)` (the gate Linear, then the
    rule): one launch for decode batches, else those two (module docstring). The workspace it
    uses is back to zero when it returns, so the op is functional."""
    num_tokens, num_experts = hidden_states.shape[0], gate_weight.shape[0]
    buffers = workspace(hidden_states.device)
    if (
        buffers is None
        or not 0 < num_tokens <= MAX_FUSED_ROUTER_TOKENS
        or num_experts > MAX_FUSED_EXPERTS
    ):
        logits = gemv.linear(hidden_states, gate_weight, None)
        return fused_select_experts(logits, top_k, scoring, renormalize)
    _check_rule(scoring, top_k, num_experts)
    return _launch_fused_router(
        hidden_states.contiguous(), gate_weight.contiguous(), buffers, top_k, scoring, renormalize
    )


def _launch_fused_router(x, gate_weight, buffers, top_k, scoring, renormalize):
    from tesela.layers.moe import kernels

    num_tokens, num_experts = x.shape[0], gate_weight.shape[0]
    weights = x.new_empty(num_tokens, top_k, dtype=_weights_dtype(x, scoring))
    ids = x.new_empty(num_tokens, top_k, dtype=torch.int64)
    config = ROUTER_GEMM_CONFIG
    grid = (cdiv(num_experts, config["BLOCK_E"]), num_tokens)
    kernels.router_gemm_topk_kernel[grid](
        x, gate_weight, buffers.logits, buffers.counters, weights, ids,
        num_experts, x.shape[1], x.stride(0), gate_weight.stride(0),
        TOP_K=top_k, RENORMALIZE=renormalize or scoring == "topk_softmax",
        BLOCK_E=config["BLOCK_E"], BLOCK_H=config["BLOCK_H"],
        BLOCK_ALL_E=next_power_of_2(num_experts),
        BLOCK_TOPK=next_power_of_2(top_k), num_warps=config["num_warps"],
        **launch_kwargs(x.device, num_tokens),
    )  # fmt: skip
    return weights, ids


@fused_router.register_fake
def _(hidden_states, gate_weight, top_k, scoring, renormalize):
    shape = (hidden_states.shape[0], top_k)
    return (
        hidden_states.new_empty(shape, dtype=_weights_dtype(hidden_states, scoring)),
        hidden_states.new_empty(shape, dtype=torch.int64),
    )
