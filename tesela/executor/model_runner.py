"""ModelRunner: owns the model, the KV pool, the attention backend and the runners, and runs
batches.

Startup runs the named phases of tesela/executor/startup.py: load weights, capture piecewise
graphs on a provisional pool, size the KV pool from what is left, capture FULL decode graphs,
verify. `forward(batch)` returns the logits of the batch's `logits_indices` rows; the
dispatcher picks the runner, and every runner plans the exact batch it runs.
"""

from __future__ import annotations

import gc
import logging

import torch

from tesela.attention.base import AttentionBackend, AttentionLayout
from tesela.attention.registry import create_backend
from tesela.config import EngineConfig
from tesela.core.forward_batch import BatchInputs, ForwardBatch
from tesela.core.kv_cache import RESERVED_BLOCKS, KVCachePool
from tesela.distributed.group import SINGLE, TPGroup
from tesela.distributed.sharding import Section
from tesela.executor import startup
from tesela.executor.dispatcher import Dispatcher, RunPath
from tesela.executor.full_decode import FullDecodeRunner
from tesela.executor.full_mixed import FullMixedRunner, MixedGraphPlanner
from tesela.executor.graph_runner import EagerRunner
from tesela.executor.graphs import graph_factory_for
from tesela.executor.piecewise.breakable import BreakablePiecewiseRunner
from tesela.executor.piecewise.compiled import CompiledPiecewiseRunner
from tesela.executor.piecewise.runner import PiecewiseRunner
from tesela.executor.planner import CudaGraphPlanner, ForwardPlanner
from tesela.executor.sampling import SampleOutput, SamplingTensors, SamplingVariant, sample
from tesela.layers import gemv
from tesela.lora.manager import LoRAManager
from tesela.models.loader import build_model

logger = logging.getLogger("tesela.runner")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CPU_KV_TOKENS = 32768
# The provisional pool: the reserved dummy block plus one, enough for capture batches.
PROVISIONAL_BLOCKS = RESERVED_BLOCKS + 1


class ModelRunner:
    def __init__(
        self, config: EngineConfig, model_path: str | None = None, tp: TPGroup = SINGLE
    ) -> None:
        self.config = config
        self.tp = tp
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.startup = startup.Startup(self.device)
        self.graph_factory = graph_factory_for(self.device)
        with self.startup.phase(startup.LOAD_WEIGHTS):
            self._load_weights(model_path)
        self.planner = ForwardPlanner(self.attn_backend, self.lora_manager)
        self.dispatcher = Dispatcher(EagerRunner(self.model, self.planner))
        # Collectives inside graphs pair up across ranks only if every rank captures the same
        # sizes in the same order: compare the plans before any capture.
        tp.check_same(config.graph.capture_plan(), "the CUDA graph capture plan")
        self._capture_piecewise()
        with self.startup.phase(startup.SIZE_KV_POOL):
            self.kv_cache = self._make_pool(self._num_kv_blocks())
            self.attn_backend.bind_kv_pool(self.kv_cache)
        self._capture_full_decode()
        self._capture_full_mixed()
        self._verify()

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @property
    def piecewise(self) -> PiecewiseRunner | None:
        return self.dispatcher.runner(RunPath.PIECEWISE)

    @property
    def full_decode(self) -> FullDecodeRunner | None:
        return self.dispatcher.runner(RunPath.FULL_DECODE)

    @property
    def full_mixed(self) -> FullMixedRunner | None:
        return self.dispatcher.runner(RunPath.FULL_MIXED)

    # ---- startup phases ---------------------------------------------------------------------

    def _load_weights(self, model_path: str | None) -> None:
        config, mc = self.config, self.config.model_config
        torch.manual_seed(config.seed)
        self.model = build_model(
            mc,
            dtype=self.dtype,
            device=self.device,
            load_format=config.load_format,
            path=model_path,
            seed=config.seed,
            tp=self.tp,
        )
        # This rank's heads: query heads split, KV heads split or replicated (sharding.py).
        rank, size = self.tp.rank, self.tp.size
        self.num_kv_heads = Section(mc.num_key_value_heads).rank_units(rank, size)[1]
        self.layout = AttentionLayout(
            num_heads=mc.num_attention_heads // size,
            num_kv_heads=self.num_kv_heads,
            head_dim=mc.head_dim,
            scale=mc.head_dim**-0.5,
            dtype=self.dtype,
            device=self.device,
            sliding_window=mc.sliding_window,
            sliding_window_layers=(
                None if mc.sliding_window_layers is None else frozenset(mc.sliding_window_layers)
            ),
        )
        # LoRA slots take their memory now, before graphs are captured and the pool is sized.
        self.lora_manager = self._make_lora_manager()
        self.kv_cache = self._make_pool(PROVISIONAL_BLOCKS)
        self.attn_backend: AttentionBackend = create_backend(
            config.attention_backend, self.layout, self.kv_cache
        )

    def _capture_piecewise(self) -> None:
        graph = self.config.graph
        if not graph.piecewise_enabled:
            self.startup.skip(startup.CAPTURE_PIECEWISE, "piecewise graphs are off")
            return
        with self.startup.phase(startup.CAPTURE_PIECEWISE):
            # Precondition: the pool is still provisional, so it holds no request's cache.
            assert self.kv_cache.num_blocks == PROVISIONAL_BLOCKS, "capture on a sized pool"
            collaborators = dict(
                model=self.model,
                planner=self.planner,
                capture_sizes=tuple(graph.capture_sizes),
                block_size=self.config.cache.block_size,
                graphs=self.graph_factory,
            )
            if graph.piecewise_cudagraph == "compiled":
                runner = CompiledPiecewiseRunner(
                    piecewise_compiler=graph.piecewise_compiler, **collaborators
                )
            else:
                runner = BreakablePiecewiseRunner(**collaborators)
            runner.capture()
            # Each split op runs eagerly between graph pieces, so the collectives in the
            # pieces pair up across ranks only if the ops and their order match.
            self.tp.check_same(runner.split_signature(), "the split ops of the piecewise graphs")
            self.dispatcher.add(RunPath.PIECEWISE, runner)

    def _capture_full_decode(self) -> None:
        graph = self.config.graph
        if not (graph.full_decode and graph.decode_batch_sizes):
            self.startup.skip(startup.CAPTURE_FULL_DECODE, "FULL decode graphs are off")
            return
        if self.device.type != "cuda":
            self.startup.skip(startup.CAPTURE_FULL_DECODE, "not on CUDA")
            return
        with self.startup.phase(startup.CAPTURE_FULL_DECODE):
            # Precondition: FULL graphs bake in the pool's addresses, so it must be final.
            assert self.attn_backend.kv_cache is self.kv_cache, "backend not on the real pool"
            self.add_full_decode(graph.decode_batch_sizes, self.config.scheduler.max_model_len)

    def add_full_decode(self, batch_sizes: tuple[int, ...], max_model_len: int):
        """Build and capture the FULL decode runner on the current (final) pool."""
        max_blocks = -(-max_model_len // self.config.cache.block_size)
        runner = FullDecodeRunner(
            model=self.model,
            planner=CudaGraphPlanner(
                self.attn_backend, max(batch_sizes), max_blocks, self.lora_manager
            ),
            batch_sizes=tuple(batch_sizes),
            max_blocks_per_seq=max_blocks,
            graphs=self.graph_factory,
            # Sampling graphs at TP=1 only: at TP>1 rank 0 samples eagerly from the gathered
            # logits (tesela/executor/multiproc.py), so the workers' replays stay the forward's.
            vocab_size=self.config.model_config.vocab_size if self.tp.size == 1 else None,
            max_sampled_rows=self.config.scheduler.max_num_seqs,
        )
        runner.capture()
        self.dispatcher.add(RunPath.FULL_DECODE, runner)
        return runner

    def _capture_full_mixed(self) -> None:
        graph = self.config.graph
        if not (graph.full_mixed and graph.capture_sizes):
            self.startup.skip(startup.CAPTURE_FULL_MIXED, "FULL mixed graphs are off")
            return
        if not self.attn_backend.supports_full_mixed:
            self.startup.skip(
                startup.CAPTURE_FULL_MIXED,
                f"{self.attn_backend.name} attention declares "
                f"{self.attn_backend.cuda_graph_support.name} graph support, not ALWAYS",
            )
            return
        if self.device.type != "cuda":
            self.startup.skip(startup.CAPTURE_FULL_MIXED, "not on CUDA")
            return
        with self.startup.phase(startup.CAPTURE_FULL_MIXED):
            assert self.attn_backend.kv_cache is self.kv_cache, "backend not on the real pool"
            scheduler = self.config.scheduler
            self.add_full_mixed(
                graph.capture_sizes, scheduler.max_num_seqs, scheduler.max_model_len
            )

    def add_full_mixed(self, sizes: tuple[int, ...], max_rows: int, max_model_len: int):
        """Build and capture the FULL mixed runner on the current (final) pool; it shares the
        graph factory's memory pool with the piecewise graphs."""
        block_size = self.config.cache.block_size
        max_blocks = -(-max_model_len // block_size)
        # No batch holds more tokens than max_rows rows of max_blocks blocks: larger sizes
        # could neither be captured with a real batch nor ever replayed.
        capacity = max_rows * max_blocks * block_size
        sizes = tuple(s for s in sizes if s <= capacity)
        if not sizes:
            raise ValueError(
                f"no FULL mixed capture size fits {max_rows} rows of {max_model_len} tokens: "
                "raise max_num_seqs / max_model_len or turn FULL mixed graphs off"
            )
        planner = MixedGraphPlanner(
            self.attn_backend, sizes, max_rows, max_blocks, self.lora_manager
        )
        runner = FullMixedRunner(
            model=self.model,
            planner=planner,
            block_size=self.config.cache.block_size,
            max_blocks_per_seq=max_blocks,
            graphs=self.graph_factory,
        )
        runner.capture()
        self.dispatcher.add(RunPath.FULL_MIXED, runner)
        return runner

    def _make_lora_manager(self) -> LoRAManager | None:
        lora = self.config.lora
        if not lora.enabled:
            return None
        graph, scheduler = self.config.graph, self.config.scheduler
        max_tokens = max(
            scheduler.max_num_batched_tokens,
            graph.max_capture_tokens,
            *graph.capture_sizes,
            *graph.decode_batch_sizes,
        )
        return LoRAManager(
            self.model,
            max_loras=lora.max_loras,
            max_lora_rank=lora.max_lora_rank,
            max_cpu_loras=lora.max_cpu_loras,
            max_num_tokens=max_tokens,
            device=self.device,
            dtype=self.dtype,
            backend=lora.backend,
            base_linear=gemv.linear,
        )

    def _verify(self) -> None:
        graph = self.config.graph
        piecewise = self.piecewise
        if not graph.verify_cudagraphs or piecewise is None:
            self.startup.skip(startup.VERIFY, "verify is off")
            return
        with self.startup.phase(startup.VERIFY):
            exact = graph.piecewise_cudagraph == "breakable" or graph.piecewise_compiler == "eager"
            piecewise.verify(
                self.kv_cache,
                self.config.model_config.vocab_size,
                tolerance=0.0 if exact else 5e-2,
            )

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

    # ---- running ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Nothing to stop: one process (TensorParallelRunner stops its workers here)."""

    def release_cuda_graphs(self) -> None:
        """Free every captured graph (the runner serves eagerly afterwards). A rank does this
        before it leaves its NCCL group: NCCL's teardown blocks while CUDA graphs that captured
        its collectives are alive (a known PyTorch/NCCL limitation)."""
        self.dispatcher.release_graphs()
        self.graph_factory.reset_all()  # also the graphs something else still references
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def execute(self, inputs: BatchInputs, feed: torch.Tensor | None = None) -> torch.Tensor:
        """Build the batch on this device and run it (the engine's entry point): the logits of
        its `logits_rows` (then its prompt-logprob rows)."""
        return self.forward(self._build(inputs, feed))

    def execute_sample(
        self,
        inputs: BatchInputs,
        tensors: SamplingTensors | None,
        variant: SamplingVariant,
        feed: torch.Tensor | None = None,
    ) -> SampleOutput:
        """Build the batch, run it and sample its `logits_rows` on the device (`forward_sample`)."""
        return self.forward_sample(self._build(inputs, feed), tensors, variant)

    def _build(self, inputs: BatchInputs, feed: torch.Tensor | None) -> ForwardBatch:
        """`feed`: the tokens a step still in flight sampled (overlap scheduling), which the
        batch's fed tokens (`inputs.feed_dst`) take their ids from, on the device."""
        full = self.full_decode
        batch = inputs.build(self.device, into=None if full is None else full.pack_buffer)
        if inputs.feed_dst:
            if feed is None:
                raise ValueError(
                    f"{batch.stamp} feeds {len(inputs.feed_dst)} token ids from a step in "
                    "flight: pass that step's sampled tokens as `feed`"
                )
            # Written in by the batch's runner, or before it by the dispatcher's route.
            batch.fed_from = feed
        return batch

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        hidden_states = self.dispatcher.run(batch)
        return self.compute_logits(hidden_states[batch.logits_indices])

    @torch.inference_mode()
    def forward_sample(
        self, batch: ForwardBatch, tensors: SamplingTensors | None, variant: SamplingVariant
    ) -> SampleOutput:
        """Forward, logits and sampling of the batch's `logits_indices` rows, left on the
        device. A FULL decode batch samples inside its graphs; others sample eagerly with the
        same function."""
        path, runner = self.dispatcher.route(batch)
        if path is RunPath.FULL_DECODE and runner.can_sample(batch):
            return runner.run_sample(batch, tensors, variant)
        hidden_states = runner.run(batch)
        return sample(self.compute_logits(hidden_states[batch.logits_indices]), tensors, variant)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden_states).float()

    @torch.inference_mode()
    def forward_eager(self, batch: ForwardBatch) -> torch.Tensor:
        """The reference path: plan this batch, run the model as written."""
        return self.dispatcher.runner(RunPath.EAGER).run(batch)
