"""FULL decode graphs: the whole forward of a decode batch, attention inside, per batch size.

Decode batches have one token per row, so their shapes depend only on the row count: each size
of the ladder is captured once with its attention metadata in the backend's persistent buffers
(`init_cuda_graph_state`). A replay copies the batch's tokens, positions and KV slots into
static buffers, lets the backend rewrite its buffers in place for this batch
(`init_forward_metadata_replay_cuda_graph`), and replays the smallest captured size that fits.
Padding rows use token 0, position 0, the dummy KV slot and a length-1 context on the dummy
block.

On CPU nothing is captured: `run` drives the same static buffers and persistent metadata and
runs the model directly, so the padding and buffer logic is tested without a GPU.
"""

from __future__ import annotations

import bisect
import gc
import logging
import time

import torch

from tesela.engine.kv_cache import DUMMY_SLOT
from tesela.executor.forward_batch import ForwardBatch, ForwardMode
from tesela.executor.forward_context import forward_context
from tesela.executor.piecewise.runner import CaptureReport

logger = logging.getLogger("tesela.decode_graph")


class DecodeGraphRunner:
    def __init__(self, model_runner, batch_sizes: tuple[int, ...], max_model_len: int) -> None:
        backend = model_runner.attn_backend
        if not hasattr(backend, "init_cuda_graph_state"):
            raise ValueError(f"attention backend {backend.name!r} cannot run in FULL decode graphs")
        self.model_runner = model_runner
        self.sizes = tuple(batch_sizes)
        self.device = model_runner.device
        self.block_size = model_runner.config.cache.block_size
        self.max_blocks = -(-max_model_len // self.block_size)
        max_bs = self.sizes[-1]
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=self.device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=self.device)
        self.out_cache_loc = torch.full(
            (max_bs,), DUMMY_SLOT, dtype=torch.int64, device=self.device
        )
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.use_cuda_graphs = self.device.type == "cuda"
        self.report = CaptureReport("full-decode", self.sizes, cuda_graphs=self.use_cuda_graphs)
        backend.init_cuda_graph_state(max_bs, self.max_blocks)

    def can_run(self, batch: ForwardBatch) -> str | None:
        if batch.batch_size > self.sizes[-1]:
            return "decode_batch_too_large"
        if batch.block_tables.shape[1] > self.max_blocks:
            return "context_too_long"
        if batch.return_input_logprobs:
            return "input_logprobs"
        return None

    def _static_batch(self, size: int) -> ForwardBatch:
        """A decode batch whose token tensors are the static buffers (what graphs read)."""
        zeros = torch.zeros(size, dtype=torch.int32, device=self.device)
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=self.input_ids[:size],
            positions=self.positions[:size],
            out_cache_loc=self.out_cache_loc[:size],
            seq_lens=zeros + 1,
            prefix_lens=zeros,
            extend_start_loc=torch.arange(size, dtype=torch.int32, device=self.device),
            block_tables=torch.zeros((size, 1), dtype=torch.int32, device=self.device),
            logits_indices=torch.arange(size, device=self.device),
            seq_lens_cpu=[1] * size,
            prefix_lens_cpu=[0] * size,
        )

    @torch.inference_mode()
    def capture(self) -> CaptureReport:
        if not self.use_cuda_graphs:
            return self.report
        runner, backend = self.model_runner, self.model_runner.attn_backend
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        gc.collect()
        gc.disable()
        try:
            with torch.cuda.stream(stream):
                for size in reversed(self.sizes):
                    batch = self._static_batch(size)
                    runner.forward_eager(batch)  # warmup, with metadata planned for it
                    backend.init_forward_metadata_capture_cuda_graph(batch)
                    lora = runner.plan_lora(batch)  # no adapter: zero-length LoRA work
                    graph = torch.cuda.CUDAGraph()
                    graph.capture_begin(pool=pool)
                    with forward_context(batch, backend, lora=lora):
                        output = runner.model(batch.input_ids, batch.positions)
                    graph.capture_end()
                    self.graphs[size] = (graph, output)
            torch.cuda.synchronize(self.device)
        finally:
            gc.enable()
        self.report.seconds = time.perf_counter() - start
        self.report.segments_per_size = 1
        torch.cuda.empty_cache()
        self.report.graph_memory_bytes = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info(self.report.summary())
        return self.report

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        n = batch.batch_size
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        self.positions[:n].copy_(batch.positions, non_blocking=True)
        self.out_cache_loc[:n].copy_(batch.out_cache_loc, non_blocking=True)
        if size > n:
            self.input_ids[n:size].zero_()
            self.positions[n:size].zero_()
            self.out_cache_loc[n:size].fill_(DUMMY_SLOT)
        backend = self.model_runner.attn_backend
        metadata = backend.init_forward_metadata_replay_cuda_graph(batch)
        # The graph runs no Python, so check the invariant here: planned for this batch.
        backend.metadata_for(batch)
        assert metadata.stamp == batch.stamp
        lora = self.model_runner.plan_lora(batch)
        self.model_runner.check_lora(batch, lora)
        if not self.use_cuda_graphs:
            with forward_context(batch, backend, lora=lora):
                return self.model_runner.model(self.input_ids[:size], self.positions[:size])[:n]
        graph, output = self.graphs[size]
        graph.replay()
        return output[:n]
