"""ModelRunner: owns the model, the KV pool and the attention backend, and runs batches.

`forward(batch)` returns the logits of the batch's `logits_indices` rows. Every path plans
attention metadata for the exact batch it runs (the metadata invariant); the graph runners
plug in through `self.graphs` and are picked per batch by the dispatcher.
"""

from __future__ import annotations

import logging

import torch

from tesela.attention.base import AttentionBackend, AttentionLayout
from tesela.attention.registry import create_backend
from tesela.config import EngineConfig
from tesela.distributed.group import SINGLE, TPGroup
from tesela.distributed.sharding import Section
from tesela.engine.kv_cache import RESERVED_BLOCKS, KVCachePool
from tesela.executor.forward_batch import BatchInputs, ForwardBatch
from tesela.executor.forward_context import forward_context
from tesela.models.loader import build_model

logger = logging.getLogger("tesela.runner")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CPU_KV_TOKENS = 32768


class ModelRunner:
    def __init__(
        self, config: EngineConfig, model_path: str | None = None, tp: TPGroup = SINGLE
    ) -> None:
        self.config = config
        self.tp = tp
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        mc = config.model_config
        torch.manual_seed(config.seed)
        self.model = build_model(
            mc,
            dtype=self.dtype,
            device=self.device,
            load_format=config.load_format,
            path=model_path,
            seed=config.seed,
            tp=tp,
        )
        # This rank's heads: query heads split, KV heads split or replicated (sharding.py).
        self.num_kv_heads = Section(mc.num_key_value_heads).rank_units(tp.rank, tp.size)[1]
        self.layout = AttentionLayout(
            num_heads=mc.num_attention_heads // tp.size,
            num_kv_heads=self.num_kv_heads,
            head_dim=mc.head_dim,
            scale=mc.head_dim**-0.5,
            dtype=self.dtype,
            device=self.device,
            sliding_window=mc.sliding_window,
        )
        # A provisional pool (the dummy block plus one) serves graph capture; the real pool is
        # sized afterwards, from what is left once weights and graphs hold their memory.
        self.kv_cache = self._make_pool(RESERVED_BLOCKS + 1)
        self.attn_backend: AttentionBackend = create_backend(
            config.attention_backend, self.layout, self.kv_cache
        )
        # Collectives inside graphs pair up across ranks only if every rank captures the same
        # sizes in the same order: compare the plans before any capture.
        tp.check_same(config.graph.capture_plan(), "the CUDA graph capture plan")
        self.graphs = self._build_graph_runners()
        self.kv_cache = self._make_pool(self._num_kv_blocks())
        self.attn_backend.kv_cache = self.kv_cache
        self.graphs.capture_decode()
        if config.graph.verify and self.graphs.piecewise is not None:
            exact = (
                config.graph.prefill_graph == "breakable" or config.graph.piece_compiler == "eager"
            )
            self.graphs.piecewise.verify(tolerance=0.0 if exact else 5e-2)

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_cache.num_blocks

    def _make_pool(self, num_blocks: int) -> KVCachePool:
        mc = self.config.model_config
        return KVCachePool(
            num_layers=mc.num_hidden_layers,
            num_blocks=num_blocks,
            block_size=self.config.cache.block_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=mc.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    def _num_kv_blocks(self) -> int:
        cache, mc = self.config.cache, self.config.model_config
        if cache.num_kv_tokens is not None or self.device.type != "cuda":
            tokens = cache.num_kv_tokens or DEFAULT_CPU_KV_TOKENS
            return RESERVED_BLOCKS + -(-tokens // cache.block_size)
        self.kv_cache = None  # drop the provisional pool before measuring
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = total * cache.gpu_memory_utilization - (total - free)
        per_block = KVCachePool.bytes_per_block(
            num_layers=mc.num_hidden_layers,
            block_size=cache.block_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=mc.head_dim,
            dtype=self.dtype,
        )
        # Every rank must hold the same blocks: the scheduler hands out one block table.
        num_blocks = self.tp.min_int(int(budget // per_block))
        if num_blocks <= RESERVED_BLOCKS:
            raise RuntimeError(
                f"no GPU memory is left for the KV cache ({free / 2**30:.1f} GiB free of "
                f"{total / 2**30:.1f}): raise gpu_memory_utilization or use a smaller model"
            )
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB)",
            num_blocks,
            cache.block_size,
            num_blocks * per_block / 2**30,
        )
        return num_blocks

    def _build_graph_runners(self):
        from tesela.executor.dispatcher import GraphRunners

        return GraphRunners.build(self)

    def shutdown(self) -> None:
        """Nothing to stop: one process (TensorParallelRunner stops its workers here)."""

    def execute(self, inputs: BatchInputs) -> torch.Tensor:
        """Build the batch on this device and run it (the engine's entry point)."""
        return self.forward(inputs.build(self.device))

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        hidden_states = self.graphs.run(batch)
        return self.compute_logits(hidden_states[batch.logits_indices])

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden_states).float()

    @torch.inference_mode()
    def forward_eager(self, batch: ForwardBatch) -> torch.Tensor:
        """The reference path: plan metadata for this batch, run the model as written."""
        self.attn_backend.init_forward_metadata(batch)
        with forward_context(batch, self.attn_backend):
            return self.model(batch.input_ids, batch.positions)
