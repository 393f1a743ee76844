"""The paged KV pool: one K and one V tensor per layer, indexed by slot.

Slot s lives in block s // block_size. Block 0 is never handed to a request: its slot 0 is the
dummy slot that padded tokens of a graph replay write to, so padding can never touch a real
request's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DUMMY_SLOT = 0
RESERVED_BLOCKS = 1


class KVCachePool:
    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_blocks <= RESERVED_BLOCKS:
            raise ValueError(
                f"the KV pool needs more than {RESERVED_BLOCKS} block(s), got {num_blocks}: "
                "give it more memory (gpu_memory_utilization / num_kv_tokens)"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        num_slots = num_blocks * block_size
        shape = (num_slots, num_kv_heads, head_dim)
        self.k_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @staticmethod
    def bytes_per_block(
        *, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


@dataclass(frozen=True)
class KVStoreTarget:
    """Where one layer's new K/V go when a kernel before attention stores them (the q/k norm +
    rotary kernel, tesela/layers/fused.py, at the attention backend's `kv_store_target`).

    The pools are found through `pointers` ([layers, 2] int64 on the device: each layer's K and
    V pool base address, `pool_pointers`), read by the kernel when it runs: a graph captures
    the table's address, not the pools', so piecewise graphs captured on the provisional pool
    store into the real one once the table is rewritten. Pools are [slots, kv_heads, head_dim],
    contiguous; tokens past `slots` are not stored."""

    pointers: torch.Tensor
    layer: int
    slots: torch.Tensor


def pool_pointers(pool: KVCachePool) -> torch.Tensor:
    """[layers, 2] int64 (host): the base address of each layer's K and V pool."""
    return torch.tensor(
        [[k.data_ptr(), v.data_ptr()] for k, v in zip(pool.k_buffers, pool.v_buffers, strict=True)],
        dtype=torch.int64,
    ).view(-1, 2)
