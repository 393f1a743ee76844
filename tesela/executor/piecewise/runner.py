"""The piecewise runner: capture every size of the ladder, replay the smallest that fits.

`PiecewiseRunner` owns what both modes share: the static buffers, the ladder and padding,
the capture loop (largest size first, one graph pool, gc paused, memory measured) and `verify`.
The modes differ only in how one size is captured and replayed: `BreakablePiecewiseRunner`
(tesela/executor/piecewise/breakable.py) and `CompiledPiecewiseRunner`
(tesela/executor/piecewise/compiled.py).

Every warmup, capture and replay pass builds a real ForwardBatch for what it runs and plans it
with `planner.plan(batch)`, so no pass can run with a plan left over from another batch. The
same code runs on CPU, where the graph factory hands out stand-in graphs.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import time
from abc import abstractmethod
from collections.abc import Callable

import torch
from tqdm import tqdm

from tesela.core.forward_batch import ForwardBatch
from tesela.core.forward_context import forward_context
from tesela.core.kv_cache import KVCachePool
from tesela.core.plan import ForwardPlan
from tesela.executor.buffers import StaticBuffers, capture_batch
from tesela.executor.graph_runner import CaptureReport, GraphRunner
from tesela.executor.graphs import GraphFactory
from tesela.executor.planner import ForwardPlanner

logger = logging.getLogger("tesela.piecewise")


class PiecewiseRunner(GraphRunner):
    mode: str

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        planner: ForwardPlanner,
        capture_sizes: tuple[int, ...],
        block_size: int,
        graphs: GraphFactory,
    ) -> None:
        self.model = model
        self.planner = planner
        self.sizes = tuple(capture_sizes)
        self.block_size = block_size
        self.graphs = graphs
        self.buffers = StaticBuffers.allocate(self.max_num_tokens, graphs.device)
        self._report = CaptureReport(
            f"piecewise {self.mode}", self.sizes, cuda_graphs=graphs.device_type == "cuda"
        )

    @property
    def name(self) -> str:
        return f"piecewise {self.mode}"

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

    def report(self) -> CaptureReport:
        return self._report

    # ---- mode hooks -----------------------------------------------------------------------

    # What a pass calls on the static buffers: the model, or its compiled pieces.
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    @abstractmethod
    def _capture_size(self, batch: ForwardBatch, plan: ForwardPlan, size: int) -> None:
        """Capture the graph(s) of one size, running `batch` under `plan`."""

    @abstractmethod
    def _replay(self, batch: ForwardBatch, plan: ForwardPlan, size: int) -> torch.Tensor:
        """Replay size `size` for `batch` (already in the static buffers) under `plan`."""

    @abstractmethod
    def split_signature(self) -> tuple:
        """The split ops between the captured pieces, in order: equal on every TP rank."""

    def _before_capture(self) -> None:
        """Work that must happen before the capture scope (compilation)."""

    # ---- capture -------------------------------------------------------------------------

    @torch.inference_mode()
    def capture(self) -> CaptureReport:
        start = time.perf_counter()
        self._before_capture()
        with self.graphs.capturing() as memory:
            for size in tqdm(
                list(reversed(self.sizes)),
                desc="Capturing piecewise graphs",
                leave=False,
                disable=len(self.sizes) < 8,
            ):
                # Warmup and capture each run a batch of their own, each with its own plan.
                warmup = self._capture_batch(size)
                plan = self.planner.plan(warmup)
                self._forward(warmup, plan, size)
                batch = self._capture_batch(size)
                plan = self.planner.plan(batch)
                self._capture_size(batch, plan, size)
        self._report.graph_memory_bytes = memory[0]
        self._report.seconds = time.perf_counter() - start
        logger.info(self._report.summary())
        return self._report

    def _capture_batch(self, size: int) -> ForwardBatch:
        """A real batch of `size` tokens on the dummy block, whose token tensors are the static
        buffers (the pieces read its KV slots from there)."""
        return self.buffers.view_batch(capture_batch(size, self.block_size, self.graphs.device))

    def _forward(self, batch, plan, size: int, split_hook=None, model_fn=None) -> torch.Tensor:
        input_ids, positions = self.buffers.slice(size)
        with forward_context(batch, plan, self.planner.attn_backend, split_hook):
            return (model_fn or self.model_fn)(input_ids, positions)

    # ---- replay --------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states of the batch's real tokens ([num_tokens, hidden])."""
        reason = self.can_run(batch)
        if reason is not None:
            raise ValueError(
                f"the piecewise runner cannot serve {batch.stamp} ({reason}; captured sizes "
                f"up to {self.max_num_tokens} tokens): run batches through the dispatcher "
                "(tesela/executor/dispatcher.py), which asks can_run first"
            )
        n = batch.num_tokens
        size = self.padded_size(n)
        self.buffers.copy_from(batch, size)
        plan = self.planner.plan(batch)
        return self._replay(batch, plan, size)[:n]

    def _eager_ops(self) -> contextlib.AbstractContextManager:
        """The ops `run_eager_padded` runs: those the replay runs."""
        return contextlib.nullcontext()

    @torch.inference_mode()
    def run_eager_padded(self, batch: ForwardBatch) -> torch.Tensor:
        """The computation a replay performs, run eagerly: same padded shapes, same kernels.

        A replay must equal this bit for bit. Against the unpadded eager forward it may differ
        in the last bits, since GEMM libraries pick kernels by row count."""
        size = self.padded_size(batch.num_tokens)
        self.buffers.copy_from(batch, size)
        plan = self.planner.plan(batch)
        with self._eager_ops():
            output = self._forward(batch, plan, size, model_fn=self.model)
        return output[: batch.num_tokens].clone()

    @torch.inference_mode()
    def verify(self, pool: KVCachePool, vocab_size: int, tolerance: float = 0.0):
        """Replay every captured size on a real random batch and compare with the same padded
        computation run eagerly; raise if any size differs by more than `tolerance`."""
        generator = torch.Generator().manual_seed(0)
        for size in self.sizes:
            blocks = -(-size // pool.block_size)
            if blocks >= pool.num_blocks:  # the pool is too small to hold this batch
                continue
            tokens = torch.randint(0, vocab_size, (size,), generator=generator).tolist()

            def batch(tokens=tokens, blocks=blocks) -> ForwardBatch:
                return ForwardBatch.build(
                    token_ids=[tokens],
                    prefix_lens=[0],
                    block_tables=[list(range(1, blocks + 1))],
                    block_size=pool.block_size,
                    device=self.graphs.device,
                )

            expected = self.run_eager_padded(batch())
            got = self.run(batch())
            diff = (got.float() - expected.float()).abs().max().item()
            self._report.verify_max_abs_diff[size] = diff
            if not diff <= tolerance:
                raise RuntimeError(
                    f"piecewise {self.mode} replay of {size} tokens differs from eager by "
                    f"{diff:.3e} (tolerance {tolerance:.1e}): run with piecewise_cudagraph='none' and "
                    "report this"
                )
        return self._report.verify_max_abs_diff
