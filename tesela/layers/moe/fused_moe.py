"""`fused_experts`: the Triton MoE forward, and the `tesela::fused_moe` custom op around it.

Steps for hidden [M, H], k experts per token, E experts of intermediate size I:
1. (prefill path) `moe_align_block_size` groups the M*k (token, expert) pairs by expert;
2. gate/up GEMM with SiLU·mul fused: intermediate [M*k, I], one row per pair;
3. down GEMM scaled by each pair's router weight: [M*k, H];
4. the sum over each token's k rows: [M, H] (a plain reduction, deterministic).
Every buffer's size depends on M, k, E and the tiles only, and nothing reads a device value on
the host, so the whole forward can be captured in a CUDA graph at a fixed token count.

The custom op keeps torch.compile from tracing into the kernels: the compiled piecewise
runner sees one opaque op with a fake implementation, and the pieces keep it.
"""

from __future__ import annotations

import torch

from tesela.layers.moe.reference import moe_reference
from tesela.layers.moe.tile_configs import get_config


def _launch(a, w, out, topk_weights, topk_ids, num_valid, aligned, config, *, gated, rows_per_pair):
    """One GEMM over all pairs: out[pair] = A[pair // rows_per_pair] @ w[expert]^T (+ extras)."""
    from tesela.layers.moe import kernels

    num_experts = w.shape[0]
    n = w.shape[1] // 2 if gated else w.shape[1]
    k = w.shape[2]
    common = dict(
        A_ROWS_PER_PAIR=rows_per_pair,
        GATED=gated,
        MUL_WEIGHT=not gated,
        BLOCK_N=config["BLOCK_N"],
        BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    strides = (*a.stride(), *w.stride(), *out.stride())
    if config["path"] == "gemv":
        grid = (topk_ids.numel(), triton_cdiv(n, config["BLOCK_N"]))
        has_valid = num_valid is not None
        kernels.pair_gemv_kernel[grid](
            a, w, out, topk_weights, topk_ids, num_valid if has_valid else topk_ids,
            num_experts, topk_ids.shape[1], n, k, *strides, HAS_NUM_VALID=has_valid, **common,
        )  # fmt: skip
        return
    num_blocks = aligned.block_expert_ids.numel()
    grid = (num_blocks * triton_cdiv(n, config["BLOCK_N"]),)
    kernels.grouped_gemm_kernel[grid](
        a, w, out, topk_weights,
        aligned.sorted_pair_ids, aligned.block_expert_ids, aligned.num_padded_pairs,
        topk_ids.numel(), n, k, *strides,
        BLOCK_M=config["BLOCK_M"], GROUP_M=config["GROUP_M"], **common,
    )  # fmt: skip


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
            get_config(num_experts, hidden, two_i // 2, num_tokens),
        )
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
    # Zeroed: with the grouped path, dropped (padding) pairs are never written.
    down = hidden_states.new_zeros(pairs, hidden)
    for config, (a, w, out, gated, rows) in zip(
        configs,
        ((hidden_states, w13, intermediate, True, top_k), (intermediate, w2, down, False, 1)),
        strict=True,
    ):
        _launch(
            a, w, out, topk_weights, topk_ids, num_valid_tokens,
            aligned.get(config.get("BLOCK_M")), config,
            gated=gated, rows_per_pair=rows,
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
