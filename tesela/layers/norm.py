"""RMSNorm, computed in float32 like the HF reference so outputs match it bit for bit in fp32.

On CUDA one fused Triton kernel does the residual add and the norm (tesela/layers/fused.py).
"""

from __future__ import annotations

import torch
from torch import nn

from tesela.distributed.group import TPGroup, all_reduce_add_norm_kernel
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


def all_reduce_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, tp: TPGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm of the sum of `x` over the tensor-parallel ranks (`x`: this rank's partial
    sums from a row-parallel layer, overwritten): the all-reduce and the next sublayer's norm.
    One kernel where the group fuses them and `x` is decode-sized
    (tesela/distributed/fused_all_reduce.py), else the all-reduce, then the fused add + norm.
    The op makes that choice per call, so a trace never branches on the token count."""
    if tp.size == 1:
        return add_rms_norm(x, residual, weight, eps)
    out, new_residual = torch.ops.tesela.all_reduce_add_rms_norm(x, residual, weight, eps, tp.name)
    return out, new_residual


@torch.library.custom_op("tesela::all_reduce_add_rms_norm", mutates_args=("x",))
def _all_reduce_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = all_reduce_add_norm_kernel(group_name)
    if kernel is not None and kernel.fits(x):
        return kernel(x, residual, weight, eps)
    torch.ops.tesela.all_reduce_(x, group_name)
    return add_rms_norm(x, residual, weight, eps)


@_all_reduce_add_rms_norm.register_fake
def _(x, residual, weight, eps, group_name):
    return x.new_empty(x.shape), x.new_empty(x.shape)


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

    def reduce_add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor, tp: TPGroup
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """add_and_norm of the sum of `x` (partial sums) over the ranks of `tp`."""
        return all_reduce_add_rms_norm(x, residual, self.weight, self.eps, tp)
