"""The reference attention backend: plain PyTorch over the paged KV pool, any device.

Planning gathers, for every row, the KV slots of its whole sequence from the block table; the
forward stores the new tokens' K/V, gathers each row's keys and values and runs SDPA with a
causal mask offset by the row's prefix. Slow but obviously right: the oracle for the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tesela.attention.base import AttentionBackend, AttentionMetadata
from tesela.core.forward_batch import ForwardBatch


@dataclass
class TorchRow:
    q_start: int
    q_len: int
    kv_slots: torch.Tensor  # [seq_len] int64
    mask: torch.Tensor  # [q_len, seq_len] bool, True where a query may attend
    window_mask: torch.Tensor | None = None  # the same within the sliding window (if any)


@dataclass
class TorchMetadata(AttentionMetadata):
    rows: list[TorchRow]


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def plan(self, batch: ForwardBatch) -> TorchMetadata:
        block_size = self.kv_cache.block_size
        window = self.layout.sliding_window
        tables = batch.block_tables.to(torch.int64)
        rows, q_start = [], 0
        for i, (seq_len, prefix) in enumerate(
            zip(batch.seq_lens_cpu, batch.prefix_lens_cpu, strict=True)
        ):
            positions = torch.arange(seq_len, device=batch.device)
            slots = tables[i, positions // block_size] * block_size + positions % block_size
            q_pos = torch.arange(prefix, seq_len, device=batch.device)[:, None]
            mask = positions[None, :] <= q_pos
            window_mask = None if window is None else mask & (positions[None, :] > q_pos - window)
            rows.append(TorchRow(q_start, seq_len - prefix, slots, mask, window_mask))
            q_start += seq_len - prefix
        return TorchMetadata(stamp=batch.stamp, rows=rows)

    def forward(
        self, q, k, v, out, layer_id, batch, metadata: TorchMetadata, kv_stored: bool = False
    ) -> None:
        if not kv_stored:
            self.store_kv(k, v, layer_id, batch)
        layout = self.layout
        k_pool = self.kv_cache.k_buffers[layer_id]
        v_pool = self.kv_cache.v_buffers[layer_id]
        heads, kv_heads, dim = layout.num_heads, layout.num_kv_heads, layout.head_dim
        windowed = layout.window(layer_id) is not None
        for row in metadata.rows:
            rows = slice(row.q_start, row.q_start + row.q_len)
            q_row = q[rows].view(row.q_len, heads, dim).transpose(0, 1)
            k_row = k_pool[row.kv_slots].transpose(0, 1)
            v_row = v_pool[row.kv_slots].transpose(0, 1)
            o = F.scaled_dot_product_attention(
                q_row,
                k_row,
                v_row,
                attn_mask=row.window_mask if windowed else row.mask,
                scale=layout.scale,
                enable_gqa=kv_heads != heads,
            )
            out[rows] = o.transpose(0, 1).reshape(row.q_len, heads * dim)
