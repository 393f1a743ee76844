"""Which LoRA kernel style a launch runs: a small policy with a reason for every choice.

Three styles add the same deltas (tesela/lora/kernels.py):
- `gather`: one fused Triton launch per target, per token (decode).
- `sgmv`: segmented Triton shrink + expand (extend/mixed).
- `dense`: cuBLAS. One GEMM shrinks every token against the stacked A of *all* slots
  (max_loras x max_rank columns per slice), one elementwise multiply keeps each token's own
  slot's columns (times its scaling; zero for the base model and padding), and one GEMM adds
  s @ B into y (B block-diagonal over the slices). It does the work of every slot for every
  token, so its waste grows with `max_loras * max_lora_rank` (and its B takes `slices` times
  the memory); in exchange its GEMMs run near the memory floor at prefill sizes, where the
  Triton pair is far from it.

The style is chosen per launch from the token count the launch sees (under capture: the
padded size, so each captured graph has one style) and the batch's kernel family (the plan's
`style`: `gather` for decode batches, `sgmv` for the rest). All styles read buffers that every
plan writes, so any style is right for any plan. The thresholds are measured, re-tunable
settings (`tesela bench lora` prints what ran), not constants buried in the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

SGMV, GATHER, DENSE = "sgmv", "gather", "dense"


@dataclass(frozen=True)
class LoRAKernelPolicy:
    """Thresholds of the style choice (0 turns a dense threshold off)."""

    dense_min_tokens: int = 128  # extend/mixed launches of at least this many tokens: dense
    dense_min_decode_tokens: int = 0  # decode launches: dense from this many tokens (0: never)
    dense_max_columns: int = 256  # max_loras * max_lora_rank above this: never dense

    def dense_allowed(self, max_loras: int, max_lora_rank: int) -> tuple[bool, str]:
        columns = max_loras * max_lora_rank
        if columns > self.dense_max_columns:
            return False, (
                f"max_loras x max_lora_rank = {columns} > {self.dense_max_columns}: the dense "
                "GEMMs would compute every slot's columns for every token"
            )
        return True, f"max_loras x max_lora_rank = {columns} <= {self.dense_max_columns}"

    def choose(self, family: str, num_tokens: int, dense_ok: bool) -> tuple[str, str]:
        """(style, reason) for a launch over `num_tokens` tokens of a `family` batch."""
        assert family in (SGMV, GATHER), family
        if not dense_ok:
            return family, "dense LoRA is off for these limits (see dense_max_columns)"
        threshold = self.dense_min_decode_tokens if family == GATHER else self.dense_min_tokens
        if threshold > 0 and num_tokens >= threshold:
            return (
                DENSE,
                f"{num_tokens} tokens >= {threshold}: cuBLAS GEMMs beat the {family} kernels",
            )
        if threshold <= 0:
            return family, f"dense is off for {family} batches"
        return (
            family,
            f"{num_tokens} tokens < {threshold}: the {family} kernels' fewer launches win",
        )
