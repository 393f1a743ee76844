"""`fused_experts`: the Triton MoE forward, and the `tesela::fused_moe` custom op around it.

Steps for hidden [M, H], k experts per token, E experts of intermediate size I:
1. (grouped path) `moe_align_block_size` groups the M*k (token, expert) pairs by expert;
2. gate/up GEMM with SiLU·mul fused: intermediate [M*k, I], one row per pair;
3. down projection scaled by each pair's router weight and summed over the token's k pairs:
   - gemv path (decode): `down_sum_gemv_kernel` writes [M, H] directly, the sum in registers;
   - grouped path (prefill): a [M*k, H] buffer, zeroed (dropped pairs are never written), then
     a plain `.view(M, k, H).sum(1)` (deterministic).
Every buffer's size depends on M, k, E and the tiles only, and nothing reads a device value on
the host, so the whole forward can be captured in a CUDA graph at a fixed token count.

Launches per MoE block at decode (gemv path), before this layout -> now: router GEMM, softmax,
topk, sum, div, dtype cast, zero-fill, gate/up, down, top-k sum (10; 9 for Mixtral, no cast)
-> router GEMM, `tesela::moe_topk` (router.py), gate/up, down-with-sum (4) -> the router GEMM
and top-k in one launch, `tesela::moe_router` (router.py), gate/up, down-with-sum (3).

The custom op keeps torch.compile from tracing into the kernels: the compiled piecewise
runner sees one opaque op with a fake implementation, and the pieces keep it.
"""

from __future__ import annotations

import torch

from tesela.core.intmath import cdiv, next_power_of_2
from tesela.core.pdl import launch_kwargs
from tesela.layers.moe.reference import moe_reference
from tesela.layers.moe.tile_configs import get_config


def _tile_args(config: dict) -> dict:
    return dict(
        BLOCK_N=config["BLOCK_N"],
        BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )


def _launch(a, w, out, topk_weights, topk_ids, num_valid, aligned, config, *, gated, rows_per_pair):
    """One GEMM over all pairs: out[pair] = A[pair // rows_per_pair] @ w[expert]^T (+ extras)."""
    from tesela.layers.moe import kernels

    num_experts = w.shape[0]
    n = w.shape[1] // 2 if gated else w.shape[1]
    k = w.shape[2]
    common = dict(A_ROWS_PER_PAIR=rows_per_pair, GATED=gated, MUL_WEIGHT=not gated)
    strides = (*a.stride(), *w.stride(), *out.stride())
    if config["path"] == "gemv":
        grid = (topk_ids.numel(), cdiv(n, config["BLOCK_N"]))
        has_valid = num_valid is not None
        kernels.pair_gemv_kernel[grid](
            a, w, out, topk_weights, topk_ids, num_valid if has_valid else topk_ids,
            num_experts, topk_ids.shape[1], n, k, *strides, HAS_NUM_VALID=has_valid,
            **common, **_tile_args(config), **launch_kwargs(a.device, topk_ids.shape[0]),
        )  # fmt: skip
        return
    num_blocks = aligned.block_expert_ids.numel()
    grid = (num_blocks * cdiv(n, config["BLOCK_N"]),)
    kernels.grouped_gemm_kernel[grid](
        a, w, out, topk_weights,
        aligned.sorted_pair_ids, aligned.block_expert_ids, aligned.num_padded_pairs,
        topk_ids.numel(), n, k, *strides,
        BLOCK_M=config["BLOCK_M"], GROUP_M=config["GROUP_M"], **common, **_tile_args(config),
        **launch_kwargs(a.device, topk_ids.shape[0]),
    )  # fmt: skip


def _down_sum_gemv(intermediate, w2, topk_weights, topk_ids, num_valid, config) -> torch.Tensor:
    """out[t] = sum over t's k pairs of weight * intermediate[pair] @ w2[expert]^T, [M, H]."""
    from tesela.layers.moe import kernels

    num_tokens, top_k = topk_ids.shape
    num_experts, hidden, intermediate_size = w2.shape
    out = intermediate.new_empty(num_tokens, hidden)  # every row is written, padding as zeros
    has_valid = num_valid is not None
    grid = (num_tokens, cdiv(hidden, config["BLOCK_N"]))
    kernels.down_sum_gemv_kernel[grid](
        intermediate, w2, out, topk_weights, topk_ids, num_valid if has_valid else topk_ids,
        num_experts, hidden, intermediate_size,
        *intermediate.stride(), *w2.stride(), *out.stride(),
        TOP_K=top_k, HAS_NUM_VALID=has_valid, BLOCK_TOPK=next_power_of_2(top_k),
        **_tile_args(config), **launch_kwargs(out.device, num_tokens),
    )  # fmt: skip
    return out


def fused_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    configs: tuple[dict, dict] | None = None,
    num_valid_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton MoE: same contract as `moe_reference` (ids outside 0..E-1 contribute nothing,
    nor do tokens from `num_valid_tokens` on, a [1] device tensor: graph padding).

    `configs` overrides the tile configs of the (gate/up, down) GEMMs (tests, the tuner)."""
    from tesela.layers.moe.align import moe_align_block_size

    num_tokens, hidden = hidden_states.shape
    num_experts, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    if configs is None:
        configs = (
            get_config(num_experts, two_i, hidden, num_tokens),
            get_config(num_experts, hidden, two_i // 2, num_tokens, gemm="down"),
        )
    up_config, down_config = configs
    topk_ids = topk_ids.contiguous()
    topk_weights = topk_weights.contiguous()
    aligned = {}
    for config in configs:
        if config["path"] == "grouped" and config["BLOCK_M"] not in aligned:
            aligned[config["BLOCK_M"]] = moe_align_block_size(
                topk_ids, config["BLOCK_M"], num_experts, num_valid_tokens
            )
    pairs = num_tokens * top_k
    intermediate = hidden_states.new_empty(pairs, two_i // 2)
    _launch(
        hidden_states, w13, intermediate, topk_weights, topk_ids, num_valid_tokens,
        aligned.get(up_config.get("BLOCK_M")), up_config, gated=True, rows_per_pair=top_k,
    )  # fmt: skip
    if down_config["path"] == "gemv":
        return _down_sum_gemv(
            intermediate, w2, topk_weights, topk_ids, num_valid_tokens, down_config
        )
    # Zeroed: with the grouped path, dropped (padding) pairs are never written.
    down = hidden_states.new_zeros(pairs, hidden)
    _launch(
        intermediate, w2, down, topk_weights, topk_ids, num_valid_tokens,
        aligned[down_config["BLOCK_M"]], down_config, gated=False, rows_per_pair=1,
    )  # fmt: skip
    return down.view(num_tokens, top_k, hidden).sum(dim=1)


@torch.library.custom_op("tesela::fused_moe", mutates_args=())
def fused_moe(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_valid_tokens: torch.Tensor | None,
    use_triton: bool,
) -> torch.Tensor:
    if use_triton:
        return fused_experts(
            hidden_states, w13, w2, topk_weights, topk_ids, num_valid_tokens=num_valid_tokens
        )
    if num_valid_tokens is not None:
        padding = torch.arange(topk_ids.shape[0], device=topk_ids.device) >= num_valid_tokens
        topk_ids = topk_ids.masked_fill(padding[:, None], w13.shape[0])
    return moe_reference(hidden_states, w13, w2, topk_weights, topk_ids)


@fused_moe.register_fake
def _(hidden_states, w13, w2, topk_weights, topk_ids, num_valid_tokens, use_triton):
    return torch.empty_like(hidden_states)
