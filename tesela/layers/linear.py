"""Linear layers whose weights may be fused from several checkpoint tensors.

`MergedLinear` holds e.g. q/k/v or gate/up in one weight so one GEMM serves them; its
`weight_loader` places each checkpoint shard into its rows. On CUDA a decode-sized input
(<= 16 tokens) may run the tuned small-M kernel of tesela/layers/gemv.py instead of cuBLAS. A
layer that the LoRA manager attached stacked adapter weights to (`attach_lora`) adds each
token's adapter delta after its GEMM (tesela/lora/layer.py).
"""

from __future__ import annotations

import torch
from torch import nn

from tesela.layers import gemv


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.lora_offsets: list[int] | None = None  # output slice offsets, once LoRA is on

    def attach_lora(self, a: torch.Tensor, b: torch.Tensor, offsets: tuple[int, ...]) -> None:
        """Serve LoRA: a [slots, slices, rank, in] and b [slots, out, rank]. Called by the LoRA
        manager (tesela/lora/manager.py), which also registers the op `forward` then runs."""
        self.register_buffer("lora_a", a, persistent=False)
        self.register_buffer("lora_b", b, persistent=False)
        device_offsets = torch.tensor(offsets, dtype=torch.int32, device=a.device)
        self.register_buffer("lora_slice_offsets", device_offsets, persistent=False)
        self.lora_offsets = list(offsets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = gemv.linear(x, self.weight, self.bias)
        if self.lora_offsets is not None:
            torch.ops.tesela.lora_linear(
                x, y, self.lora_a, self.lora_b, self.lora_slice_offsets, self.lora_offsets
            )
        return y


class MergedLinear(Linear):
    """One weight made of named row blocks, e.g. {"q": 2048, "k": 512, "v": 512}."""

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shards.values()), bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shards.items():
            self.shard_offsets[name] = (offset, size)
            offset += size

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: str) -> None:
        offset, size = self.shard_offsets[shard]
        if loaded.shape[0] != size:
            raise ValueError(
                f"checkpoint shard {shard!r} has {loaded.shape[0]} rows, the model expects {size}"
            )
        param.data[offset : offset + size].copy_(loaded)
