"""Triton kernels of the `triton` attention backend, over the paged KV pool.

- `store_kv`: writes the new tokens' K and V into their pool slots (one launch for both).
- `extend_attention`: causal attention of the new tokens of every row over the row's whole
  sequence (prefill, prefill chunks, mixed batches).
- `decode_attention`: one query token per row, split-KV (flash-decoding) for long contexts.
- `launcher`: cached launches of the compiled kernels (no per-call argument binding); each
  kernel's parameters are grouped (layer, pool, batch, constants) for it.

Every kernel reads the pool through the block table: position p of row i lives in slot
`block_tables[i, p // page_size] * page_size + p % page_size`. The shape every kernel shares
is `PagedAttentionShape`; this module imports no triton, so it is safe to import anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tesela.core.intmath import next_power_of_2

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HEAD_DIM = 256  # one head row must fit the shared memory of a program with its K/V tiles
MIN_DOT_DIM = 16  # tl.dot needs every dimension >= 16


@dataclass(frozen=True)
class PagedAttentionShape:
    """What every kernel launch of one backend shares: heads, page size, scale, window."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    scale: float
    sliding_window: int | None = None

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 = MHA, >1 = GQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def block_d(self) -> int:
        # A power of two for tl.arange; head dims in between (96) are masked.
        return max(next_power_of_2(self.head_dim), MIN_DOT_DIM)

    @property
    def window(self) -> int:
        """The sliding window as the kernels take it: 0 means none."""
        return self.sliding_window or 0

    @property
    def scale_log2(self) -> float:
        # The kernels use exp2: fold log2(e) into the softmax scale once.
        return self.scale * 1.4426950408889634


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: fp32 inputs must not silently become tf32 (the fp32 path is the
    exact one); half types ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_row_major(name: str, tensor: torch.Tensor) -> None:
    """The kernels take one row stride per tensor and need the columns contiguous; a column
    slice of a fused qkv output qualifies, a transposed tensor does not."""
    if tensor.dim() != 2 or (tensor.shape[1] > 1 and tensor.stride(1) != 1):
        raise ValueError(
            f"triton attention needs {name} as a [tokens, width] tensor with contiguous columns "
            f"(stride 1), got shape {tuple(tensor.shape)} with strides {tensor.stride()}: "
            "pass a row-major tensor or a column slice of one"
        )
