"""The piecewise runner: capture every size of the ladder, replay the smallest that fits.

Capture runs largest size first into one shared graph pool, with the garbage collector paused,
a progress bar, and GPU memory measured before and after. Every warmup and capture pass builds
a real ForwardBatch for what it runs and plans attention metadata for it, so no pass can ever
run with metadata left over from another batch (DESIGN.md §3).

On CPU there is no graph capture: the same runner runs the model directly over the same static
buffers, so padding, slicing, fallback and metadata handling are exercised without a GPU.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import logging
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from tesela.config import GraphConfig
from tesela.executor.forward_batch import ForwardBatch
from tesela.executor.forward_context import forward_context
from tesela.executor.piecewise.breakable import BreakableGraph, SegmentRecorder
from tesela.executor.piecewise.buffers import StaticBuffers, capture_batch
from tesela.layers import fused

logger = logging.getLogger("tesela.piecewise")


@dataclass
class CaptureReport:
    strategy: str
    sizes: tuple[int, ...]
    seconds: float = 0.0
    graph_memory_bytes: int = 0
    segments_per_size: int = 0
    cuda_graphs: bool = False
    verify_max_abs_diff: dict[int, float] = field(default_factory=dict)

    @property
    def graph_memory_gib(self) -> float:
        return self.graph_memory_bytes / 2**30

    def summary(self) -> str:
        kind = "CUDA graphs" if self.cuda_graphs else "no capture (CPU)"
        return (
            f"{self.strategy}: {len(self.sizes)} sizes "
            f"({self.sizes[0]}..{self.sizes[-1]} tokens), {self.segments_per_size} pieces each, "
            f"{kind}, built in {self.seconds:.2f} s, graph memory {self.graph_memory_gib:.3f} GiB"
        )


class PiecewiseRunner:
    def __init__(self, model_runner, config: GraphConfig) -> None:
        self.model_runner = model_runner
        self.config = config
        self.sizes = tuple(config.capture_sizes)
        self.strategy = config.prefill_graph
        self.device = model_runner.device
        self.use_cuda_graphs = self.device.type == "cuda"
        self.buffers = StaticBuffers.allocate(self.max_num_tokens, self.device)
        self.graphs: dict[int, BreakableGraph] = {}
        self.compiled = None
        self.report = CaptureReport(
            f"piecewise {self.strategy}", self.sizes, cuda_graphs=self.use_cuda_graphs
        )

    @property
    def max_num_tokens(self) -> int:
        return self.sizes[-1]

    def padded_size(self, num_tokens: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, num_tokens)]

    def can_run(self, batch: ForwardBatch) -> str | None:
        """None when the batch can be replayed, else the fallback reason."""
        if batch.num_tokens > self.max_num_tokens:
            return "too_many_tokens"
        if batch.return_input_logprobs:
            return "input_logprobs"
        return None

    # ---- capture -------------------------------------------------------------------------

    def capture(self) -> CaptureReport:
        if self.strategy == "compiled":
            from tesela.executor.piecewise.compiled import CompiledPieces

            self.compiled = CompiledPieces(self.model_runner, self.config)
        start = time.perf_counter()
        if self.use_cuda_graphs:
            self._capture_cuda()
        elif self.compiled is not None:
            for size in reversed(self.sizes):
                self._warmup(size)  # compiles once (dynamic token dim), then runs every size
        if self.compiled is not None:
            self.report.segments_per_size = len(self.compiled.pieces)
        self.report.seconds = time.perf_counter() - start
        logger.info(self.report.summary())
        return self.report

    def _capture_cuda(self) -> None:
        if self.compiled is not None:
            self._warmup(self.sizes[-1])  # compile outside the memory measurement, gc on
        # Empty the ordinary cache on both sides, so the difference is the graph pool alone
        # (warmups and eager attention leave cached blocks that are not graph memory).
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        gc.collect()
        gc.disable()  # a collection per capture costs seconds over a ladder (vLLM #10059)
        try:
            with torch.cuda.stream(stream):
                for size in tqdm(
                    list(reversed(self.sizes)),
                    desc="Capturing piecewise graphs",
                    leave=False,
                    disable=len(self.sizes) < 8,
                ):
                    self._warmup(size)
                    self._capture_size(size, pool)
            torch.cuda.synchronize(self.device)
        finally:
            gc.enable()
        torch.cuda.empty_cache()
        self.report.graph_memory_bytes = free_before - torch.cuda.mem_get_info(self.device)[0]

    def _run_model(
        self, batch: ForwardBatch, num_tokens: int, split_hook=None, plain=False, lora=None
    ):
        input_ids, positions = self.buffers.slice(num_tokens)
        backend = self.model_runner.attn_backend
        with forward_context(batch, backend, split_hook, lora=lora):
            if self.compiled is not None and not plain:
                return self.compiled(input_ids, positions)
            return self.model_runner.model(input_ids, positions)

    @torch.inference_mode()
    def _warmup(self, size: int) -> None:
        batch = self._plan_capture_batch(size)
        lora = self.model_runner.plan_lora(batch)
        self.buffers.copy_from(batch, size)
        self._run_model(batch, size, lora=lora)

    @torch.inference_mode()
    def _capture_size(self, size: int, pool) -> None:
        batch = self._plan_capture_batch(size)
        # No adapter in the capture batch: the LoRA kernels are captured as zero-length work.
        lora = self.model_runner.plan_lora(batch)
        self.buffers.copy_from(batch, size)
        if self.compiled is not None:
            # Each compiled piece captures its own graph for this size (CompiledPieces).
            with self.compiled.capturing(size, pool):
                self._run_model(batch, size, lora=lora)
            return
        graph = BreakableGraph(size)
        recorder = SegmentRecorder(graph, pool)
        recorder.begin()
        output = self._run_model(batch, size, split_hook=recorder, lora=lora)
        recorder.finish(output)
        self.graphs[size] = graph
        self.report.segments_per_size = len(graph.segments)

    def _plan_capture_batch(self, size: int) -> ForwardBatch:
        runner = self.model_runner
        batch = capture_batch(size, runner.kv_cache.block_size, self.device)
        runner.attn_backend.init_forward_metadata(batch)
        return batch

    @torch.inference_mode()
    def verify(self, tolerance: float = 0.0) -> dict[int, float]:
        """Replay every captured size on a real random batch and compare with the same padded
        computation run eagerly; raise if any size differs by more than `tolerance`."""
        pool = self.model_runner.kv_cache
        generator = torch.Generator().manual_seed(0)
        vocab = self.model_runner.config.model_config.vocab_size
        for size in self.sizes:
            blocks = -(-size // pool.block_size)
            if blocks >= pool.num_blocks:  # the pool is too small to hold this batch
                continue
            tokens = torch.randint(0, vocab, (size,), generator=generator).tolist()

            def batch(tokens=tokens, blocks=blocks) -> ForwardBatch:
                return ForwardBatch.build(
                    token_ids=[tokens],
                    prefix_lens=[0],
                    block_tables=[list(range(1, blocks + 1))],
                    block_size=pool.block_size,
                    device=self.device,
                )

            expected = self.run_eager_padded(batch())
            got = self.run(batch())
            diff = (got.float() - expected.float()).abs().max().item()
            self.report.verify_max_abs_diff[size] = diff
            if not diff <= tolerance:
                raise RuntimeError(
                    f"piecewise {self.strategy} replay of {size} tokens differs from eager by "
                    f"{diff:.3e} (tolerance {tolerance:.1e}): run with prefill_graph='none' and "
                    "report this"
                )
        return self.report.verify_max_abs_diff

    # ---- replay --------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states of the batch's real tokens ([num_tokens, hidden])."""
        n = batch.num_tokens
        size = self.padded_size(n)
        self.buffers.copy_from(batch, size)
        self.model_runner.attn_backend.init_forward_metadata(batch)
        lora = self.model_runner.plan_lora(batch)
        # Captured LoRA kernels run no Python at replay: check their state here.
        self.model_runner.check_lora(batch, lora)
        if self.use_cuda_graphs and self.compiled is None:
            with forward_context(batch, self.model_runner.attn_backend, lora=lora):
                output = self.graphs[size].replay()
        else:
            # CPU, or compiled pieces (which replay their per-size graphs themselves).
            output = self._run_model(batch, size, lora=lora)
        return output[:n]

    @torch.inference_mode()
    def run_eager_padded(self, batch: ForwardBatch) -> torch.Tensor:
        """The computation a replay performs, run eagerly: same padded shapes, same kernels.

        A replay must equal this bit for bit. Against the unpadded eager forward it may differ
        in the last bits, since GEMM libraries pick kernels by row count."""
        size = self.padded_size(batch.num_tokens)
        self.buffers.copy_from(batch, size)
        self.model_runner.attn_backend.init_forward_metadata(batch)
        lora = self.model_runner.plan_lora(batch)
        # Compiled pieces trace the PyTorch ops (inductor fuses them itself), not our kernels.
        plain_ops = fused.disabled() if self.compiled is not None else contextlib.nullcontext()
        with plain_ops:
            return self._run_model(batch, size, plain=True, lora=lora)[: batch.num_tokens].clone()
