"""The Llama family: Llama, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k RMSNorm).

Its decoder layer also serves the mixture-of-experts models (tesela/models/moe.py), whose
layers take a `SparseMoeBlock` as their MLP.

Ordinary PyTorch with `forward(input_ids, positions) -> hidden_states`; attention goes through
the `tesela::attention` split op, which reads the batch from the forward context. Parameter
names follow HF checkpoints except for the fused `qkv_proj` and `gate_up_proj`, which
`STACKED_PARAMS` maps back to the checkpoint's separate tensors.

Tensor parallelism (`tp`, a `TPGroup`): qkv and gate_up are column-parallel (this rank's query
heads, KV heads — split, or replicated when tp exceeds their count — and MLP columns), o_proj
and down_proj row-parallel, the embedding and LM head vocab-parallel. o_proj and down_proj
leave their partial sums to the norm that follows them (`RMSNorm.reduce_add_and_norm`): the
all-reduce, the residual add and the norm are one kernel in decode batches where the group
fuses them (tesela/distributed/fused_all_reduce.py). With tp of size 1 every layer runs
exactly the single-GPU computation.
"""

from __future__ import annotations

import torch
from torch import nn

from tesela.attention.op import kv_store_target  # (also registers torch.ops.tesela.attention)
from tesela.config import ModelConfig
from tesela.distributed.group import SINGLE, TPGroup
from tesela.distributed.sharding import Section
from tesela.layers import fused, gemv
from tesela.layers.linear import ColumnParallelLinear, RowParallelLinear
from tesela.layers.moe.layer import SparseMoeBlock
from tesela.layers.norm import RMSNorm
from tesela.layers.rotary import RotaryEmbedding
from tesela.layers.vocab import ParallelLMHead, VocabParallelEmbedding

# checkpoint name fragment -> (fused parameter fragment, shard name)
STACKED_PARAMS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


class LlamaAttention(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_id: int, rotary: RotaryEmbedding, tp: TPGroup = SINGLE
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = config.head_dim
        q_heads = Section(config.num_attention_heads, config.head_dim)
        kv_heads = Section(config.num_key_value_heads, config.head_dim)
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size,
            {"q": q_heads, "k": kv_heads, "v": kv_heads},
            bias=config.attention_bias,
            tp=tp,
        )
        self.q_size, self.kv_size, _ = self.qkv_proj.output_sizes
        self.num_heads = self.q_size // self.head_dim  # this rank's heads
        self.num_kv_heads = self.kv_size // self.head_dim
        # Partial sums under tensor parallelism: the post-attention norm reduces them.
        self.o_proj = RowParallelLinear(q_heads, config.hidden_size, tp=tp, reduce_results=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = rotary

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.attend(positions, self.qkv_proj(hidden_states))

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """Attention from the qkv projection's output: q/k norm, rotary, attention, o_proj."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        kv_stored = False
        if fused.fused_enabled(qkv):  # q/k norm and rotary in one launch (and the KV store)
            target = kv_store_target(self.layer_id)
            q, k = fused.qk_norm_rope(
                qkv,
                positions,
                self.rotary.cos_sin_cache,
                self.num_heads,
                self.num_kv_heads,
                self._norm_weights(),
                self.q_norm.eps if self.q_norm is not None else 0.0,
                kv_store=target,
            )
            kv_stored = target is not None
        else:
            q = q.view(-1, self.num_heads, self.head_dim)
            k = k.view(-1, self.num_kv_heads, self.head_dim)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary(positions, q, k)
        out = torch.empty_like(q)
        torch.ops.tesela.attention(q, k, v, out, self.layer_id, kv_stored)
        return self.o_proj(out)

    def _norm_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.q_norm is None:
            return None
        return self.q_norm.weight, self.k_norm.weight


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only 'silu')")
        columns = Section(config.intermediate_size)
        self.gate_up_proj = ColumnParallelLinear(
            config.hidden_size, {"gate": columns, "up": columns}, tp=tp
        )
        self.intermediate_size = self.gate_up_proj.output_sizes[0]  # this rank's columns
        # Partial sums under tensor parallelism: the next layer's input norm reduces them.
        self.down_proj = RowParallelLinear(columns, config.hidden_size, tp=tp, reduce_results=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up_proj(x))

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """down_proj(silu(gate) * up), the activation fused with the GEMM where tuned (this
        rank's partial sums under tensor parallelism)."""
        return gemv.silu_linear(gate_up, self.down_proj)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_id: int, rotary: RotaryEmbedding, tp: TPGroup = SINGLE
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id, rotary, tp)
        # Mixture-of-experts models (Qwen3-MoE, Mixtral) differ from Llama only here. Under
        # tensor parallelism the experts are replicated: every rank computes the whole block
        # from the whole (all-reduced) hidden states, so no collective is needed.
        self.mlp = (
            SparseMoeBlock(config.hidden_size, config.moe)
            if config.is_moe_layer(layer_id)
            else LlamaMLP(config, tp)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tp = tp
        # Under tensor parallelism a dense MLP's output is this rank's partial sums (the next
        # norm reduces them); experts are replicated, so an MoE block's output is whole.
        self.leaves_partial_sums = tp.size > 1 and isinstance(self.mlp, LlamaMLP)
        self.reduces_input = False  # set by LlamaModel: the previous layer left partial sums

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual stream is carried separately so each add fuses with the norm after it,
        # and (in small decode batches, where tuned) the norm with the GEMM after it.
        attn, mlp, split = self.self_attn, self.mlp, self.tp.size > 1
        qkv, residual = self._norm_linear(
            hidden_states, residual, self.input_layernorm, attn.qkv_proj, self.reduces_input
        )
        hidden_states = attn.attend(positions, qkv)  # partial sums under tensor parallelism
        if isinstance(mlp, SparseMoeBlock):  # the router and experts both read the normed states
            norm = self.post_attention_layernorm
            normed, residual = norm.reduce_add_and_norm(hidden_states, residual, self.tp)
            return mlp(normed), residual
        gate_up, residual = self._norm_linear(
            hidden_states, residual, self.post_attention_layernorm, mlp.gate_up_proj, split
        )
        return mlp.down(gate_up), residual

    def _norm_linear(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm, proj, reduce: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(proj(norm(residual + x)), residual + x), where `reduce` says x holds this rank's
        partial sums (all-reduced with the add and norm, then the GEMM); else the add and
        norm fused with the GEMM where tuned."""
        if not reduce:
            return gemv.norm_linear(x, residual, norm, proj)
        normed, residual = norm.reduce_add_and_norm(x, residual, self.tp)
        return proj(normed), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        rotary = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary, tp) for i in range(config.num_hidden_layers)
        )
        for before, layer in zip(self.layers, self.layers[1:], strict=False):
            layer.reduces_input = before.leaves_partial_sums
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = rotary
        self.tp = tp

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None  # whole: reduced inside
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        if self.layers[-1].leaves_partial_sums:
            return self.norm.reduce_add_and_norm(hidden_states, residual, self.tp)[0]
        return self.norm.add_and_norm(hidden_states, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Also serves MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM."""

    stacked_params = STACKED_PARAMS

    def __init__(self, config: ModelConfig, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def init_buffers(self, device: torch.device | str) -> None:
        self.model.rotary.init_cache(device)
