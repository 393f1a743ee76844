"""Rotary position embedding (neox style, as Llama/Qwen use), with `llama3` frequency scaling.

cos/sin are precomputed in float32 for every position up to max_position_embeddings and
gathered per token, which keeps the op graph-capturable (no host sync, static shapes).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tesela.config import RopeScaling
from tesela.layers import fused


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    if scaling.rope_type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)

    def init_cache(self, device: torch.device | str) -> None:
        """(Re)build the cos/sin table; called after the model leaves the meta device."""
        inv_freq = inverse_frequencies(self.head_dim, self.theta, self.scaling).to(device)
        positions = torch.arange(self.max_positions, device=device, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_sin_cache = torch.stack((emb.cos(), emb.sin()))  # [2, positions, head_dim]

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim] -> q, k as
        [tokens, heads * head_dim]."""
        if fused.fused_enabled(q):
            cache = self.cos_sin_cache
            return fused.rotary(q, positions, cache), fused.rotary(k, positions, cache)
        cos = self.cos_sin_cache[0][positions].unsqueeze(1).to(q.dtype)
        sin = self.cos_sin_cache[1][positions].unsqueeze(1).to(q.dtype)
        q_out = q * cos + rotate_half(q) * sin
        k_out = k * cos + rotate_half(k) * sin
        return q_out.flatten(1), k_out.flatten(1)
