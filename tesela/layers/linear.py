"""Linear layers, replicated or split over the tensor-parallel group.

  Linear                  the whole weight on every rank.
  ColumnParallelLinear    output rows split: a stack of named sections (q/k/v, gate/up), each
                          split by its own units (`Section`), so one GEMM serves them all and
                          each rank's q, k and v stay aligned head for head. No collective.
  RowParallelLinear       input columns split, matching the column-parallel layer before it;
                          the partial sums are all-reduced, then the bias is added once. With
                          `reduce_results=False` the layer returns its partial sums and the
                          model reduces them in the next norm (RMSNorm.reduce_add_and_norm:
                          one kernel for decode batches where the group fuses them).

Weights load per rank straight from a checkpoint tensor *source*: a safetensors slice
(`safe_open(...).get_slice(name)`) or a tensor. `weight_loader(param, source, shard)` reads
only the rows or columns this rank holds, so no rank ever materialises the whole model.

On CUDA a decode-sized input (<= 16 tokens) may run the tuned small-M kernel of
tesela/layers/gemv.py instead of cuBLAS.

A layer that the LoRA manager attached stacked adapter weights to (`attach_lora`) adds each
token's adapter delta after its GEMM (tesela/lora/layer.py); with tensor parallelism LoRA is
refused at startup (tesela/engine/llm_engine.py).
"""

from __future__ import annotations

import torch
from torch import nn

from tesela.distributed.group import SINGLE, TPGroup
from tesela.distributed.sharding import Section
from tesela.layers import gemv


def source_shape(source) -> tuple[int, ...]:
    """Shape of a safetensors slice or a tensor."""
    return tuple(source.get_shape()) if hasattr(source, "get_shape") else tuple(source.shape)


def check_shape(name: str, source, expected: tuple[int, ...]) -> None:
    got = source_shape(source)
    if got != tuple(expected):
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {got}, the model expects {tuple(expected)}: "
            "does config.json match the weights?"
        )


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
        if self.lora_offsets is None:
            return gemv.linear(x, self.weight, self.bias)
        return torch.ops.tesela.lora_linear(
            x, self.weight, self.bias, self.lora_a, self.lora_b, self.lora_slice_offsets,
            self.lora_offsets,
        )  # fmt: skip


class ColumnParallelLinear(Linear):
    """Rows made of named sections, e.g. {"q": Section(32, 128), "k": ..., "v": ...}; each
    rank holds its units of every section, back to back in section order."""

    def __init__(
        self,
        in_features: int,
        sections: dict[str, Section],
        bias: bool = False,
        tp: TPGroup = SINGLE,
    ) -> None:
        shard_offsets: dict[str, tuple[int, int]] = {}  # section -> (row offset, rows)
        offset = 0
        for name, section in sections.items():
            rows = section.rank_rows(tp.rank, tp.size)[1]
            shard_offsets[name] = (offset, rows)
            offset += rows
        super().__init__(in_features, offset, bias)
        self.sections = dict(sections)
        self.shard_offsets = shard_offsets
        self.in_features = in_features
        self.tp = tp

    @property
    def output_sizes(self) -> list[int]:
        """Rows of each section on this rank, in order (for splitting the output)."""
        return [rows for _, rows in self.shard_offsets.values()]

    def weight_loader(self, param: nn.Parameter, source, shard: str | None, name: str) -> None:
        """Copy this rank's rows of section `shard` (None: the only section) from `source`."""
        shard = shard if shard is not None else next(iter(self.sections))
        section = self.sections[shard]
        full = (section.rows, self.in_features) if param.dim() == 2 else (section.rows,)
        check_shape(name, source, full)
        first, rows = section.rank_rows(self.tp.rank, self.tp.size)
        offset, size = self.shard_offsets[shard]
        assert size == rows
        param.data[offset : offset + rows].copy_(source[first : first + rows])


class RowParallelLinear(Linear):
    """Input columns split like `input_section` (the column-parallel output feeding it)."""

    def __init__(
        self,
        input_section: Section,
        out_features: int,
        bias: bool = False,
        tp: TPGroup = SINGLE,
        reduce_results: bool = True,
    ) -> None:
        if bias and not reduce_results:
            raise ValueError("a bias is added after the all-reduce: keep reduce_results=True")
        super().__init__(input_section.rank_rows(tp.rank, tp.size)[1], out_features, bias)
        self.input_section = input_section
        self.tp = tp
        self.reduce_results = reduce_results

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x)  # the plain layer, LoRA delta included
        if not self.reduce_results:  # partial sums: the caller reduces them
            return gemv.linear(x, self.weight, None)
        out = self.tp.all_reduce_(gemv.linear(x, self.weight, None))
        return out if self.bias is None else out + self.bias

    def weight_loader(self, param: nn.Parameter, source, shard: str | None, name: str) -> None:
        if param.dim() == 1:  # the bias is whole on every rank
            check_shape(name, source, tuple(param.shape))
            param.data.copy_(source[:])
            return
        check_shape(name, source, (param.shape[0], self.input_section.rows))
        first, cols = self.input_section.rank_rows(self.tp.rank, self.tp.size)
        param.data.copy_(source[:, first : first + cols])
