"""RMSNorm, computed in float32 like the HF reference so outputs match it bit for bit in fp32.

On CUDA one fused Triton kernel does the residual add and the norm (tesela/layers/fused.py).
"""

from __future__ import annotations

import torch
from torch import nn

from tesela.layers import fused


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x: the fused kernel where enabled, else the reference math in float32."""
    if fused.fused_enabled(x):
        return fused.rms_norm(x, weight, eps)[0]
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x)."""
    if fused.fused_enabled(x):
        return fused.rms_norm(x, weight, eps, residual)
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): the residual stream's add fused with its norm."""
        return add_rms_norm(x, residual, self.weight, self.eps)
