"""Mixture-of-experts models: Qwen3-MoE and Mixtral.

Both are the Llama decoder (tesela/models/llama.py) with a `SparseMoeBlock` as the MLP of their
sparse layers (`ModelConfig.is_moe_layer`); Qwen3-MoE's dense layers (`mlp_only_layers`,
`decoder_sparse_step`) keep `LlamaMLP`. What this module adds is the checkpoint naming: each
expert's tensors (`experts.{e}.gate_proj/up_proj/down_proj`, Mixtral's `w1/w3/w2` under
`block_sparse_moe`) go into their slice of the stacked expert parameters.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from tesela.layers.moe import padding, router
from tesela.models.llama import LlamaForCausalLM

_EXPERT_TENSOR = re.compile(
    r"^(?P<prefix>.*)\.(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\."
    r"(?P<kind>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$"
)
_KIND = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up"}


class MoeForCausalLM(LlamaForCausalLM):
    """Serves Qwen3MoeForCausalLM and MixtralForCausalLM."""

    @staticmethod
    def map_checkpoint_name(ckpt_name: str) -> tuple[str, Any] | None:
        """(parameter name, shard) for the tensors this model names differently, else None."""
        match = _EXPERT_TENSOR.match(ckpt_name)
        if match:
            kind = _KIND.get(match["kind"], "down")
            param = "gate_up_proj" if kind != "down" else "down_proj"
            return f"{match['prefix']}.mlp.experts.{param}", (int(match["expert"]), kind)
        if ".block_sparse_moe." in ckpt_name:  # Mixtral's router: block_sparse_moe.gate
            return ckpt_name.replace(".block_sparse_moe.", ".mlp."), None
        return None

    def init_buffers(self, device: torch.device | str) -> None:
        super().init_buffers(device)
        padding.allocate(device)
        router.allocate_workspace(device)
