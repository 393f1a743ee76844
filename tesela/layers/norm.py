"""RMSNorm, computed in float32 like the HF reference so outputs match it bit for bit in fp32.

On CUDA one fused Triton kernel does the residual add and the norm (tesela/layers/fused.py).
"""

from __future__ import annotations

import torch
from torch import nn

from tesela.layers import fused


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.fused_enabled(x):
            return fused.rms_norm(x, self.weight, self.eps)[0]
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): the residual stream's add fused with its norm."""
        if fused.fused_enabled(x):
            return fused.rms_norm(x, self.weight, self.eps, residual)
        residual = residual + x
        return self(residual), residual
