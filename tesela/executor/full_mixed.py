"""FULL mixed graphs: the whole forward of any batch (extend, mixed, decode), attention inside,
per padded token count.

For backends that declare ALWAYS graph support (tesela/attention/policy.py): their attention
reads every per-batch value (row starts, prefix and sequence lengths, block tables, the tile
table that gives each program its row) from persistent buffers that `MixedGraphPlanner.plan`
rewrites in place, and launches grids fixed per captured size. A replay plans the batch and
replays the smallest captured size that fits. The host does no per-row work: planning copies
the batch's pack (its tokens, lengths and block tables, which `ForwardBatch.build` uploaded in
one buffer) into the backend's buffers, one device-to-device copy; the graph's first op
(`mixed_graph_prologue`) writes the tokens into the static buffers the model reads, padded with
token 0, position 0 and the dummy KV slot up to the graph's size, and derives the metadata.
Padding is zero-length work: no tile of the table covers a padding token, and its KV store hits
only the dummy slot.

A graph captured for N tokens serves at most `max_rows` rows (its tile table and row buffers
are that large): `can_run` refuses a batch with more, and planning one raises.

With LoRA on, the same planning call writes the batch's adapter segments into the LoRA
manager's persistent buffers (tesela/lora/state.py); the graphs, captured on a batch with no
adapter, launch the segmented (`sgmv`) LoRA kernels with grids fixed by N, and padding tokens
fall in a trailing slot -1 segment (zero-length work). A replay checks its plan first
(`ForwardPlanner.check_replay`): a plan without a LoRA part, or whose buffers another batch's
plan rewrote, raises instead of reading another batch's adapters.

Warmup, capture and replay are the same code on every device; on CPU the graph is the `CpuGraph`
stand-in (tesela/executor/graphs.py), which re-runs the captured forward over the same static
buffers and persistent metadata, so a launch value that depended on the capture batch would
show up as a wrong result on CPU.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import torch

from tesela.attention.base import AttentionBackend
from tesela.core.forward_batch import ForwardBatch
from tesela.core.forward_context import batch_state, forward_context
from tesela.core.plan import ForwardPlan
from tesela.executor.buffers import StaticBuffers, capture_batch
from tesela.executor.graph_runner import CaptureReport, GraphRunner
from tesela.executor.graphs import GraphFactory
from tesela.executor.planner import ForwardPlanner
from tesela.lora.kernels import SGMV
from tesela.lora.manager import LoRAManager

logger = logging.getLogger("tesela.full_mixed")


class MixedGraphPlanner(ForwardPlanner):
    """Plans batches for FULL mixed graphs: the attention metadata views the backend's
    persistent buffers, rewritten with the batch; its launch values depend only on the captured
    size the batch pads to."""

    def __init__(
        self,
        attn_backend: AttentionBackend,
        sizes: tuple[int, ...],
        max_rows: int,
        max_blocks_per_seq: int,
        lora: LoRAManager | None = None,
    ) -> None:
        if not attn_backend.supports_full_mixed:
            raise ValueError(
                f"attention backend {attn_backend.name!r} declares "
                f"{attn_backend.cuda_graph_support.name} graph support, not ALWAYS: it cannot "
                "run extend or mixed batches in a FULL graph; use piecewise graphs"
            )
        if lora is not None and lora.backend != "triton":
            raise ValueError(
                f"lora_backend={lora.backend!r} adds the LoRA deltas from host-side segments, "
                "which a FULL mixed graph would bake in at capture: use lora_backend='triton'"
            )
        super().__init__(attn_backend, lora)
        self.sizes = tuple(sizes)
        self.max_rows = max_rows
        attn_backend.init_mixed_graph_state(max_rows, max_blocks_per_seq, self.sizes[-1])

    def padded_size(self, num_tokens: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, num_tokens)]

    def key(self, batch: ForwardBatch) -> tuple[int, bool]:
        """The graph that serves `batch`: its padded size, and whether it has 1-token rows
        (decode rows), which the variant with the split-KV decode launch serves; the other
        variant spares prefill-only batches that launch."""
        return self.padded_size(batch.num_tokens), 1 in batch.extend_lens_cpu

    def plan(self, batch: ForwardBatch, split_decode: bool | None = None) -> ForwardPlan:
        """Plan `batch` for its graph (`key`); capture names the variant it captures."""
        if split_decode is None:
            size, split_decode = self.key(batch)
        else:
            size = self.padded_size(batch.num_tokens)
        metadata = self.attn_backend.plan_mixed_graph(batch, size, split_decode)
        # The graphs launch the segmented LoRA kernels whatever the batch (decode rows too).
        return ForwardPlan(batch.stamp, metadata, lora=self._lora(batch, SGMV))


class FullMixedRunner(GraphRunner):
    name = "full mixed"

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        planner: MixedGraphPlanner,
        block_size: int,
        max_blocks_per_seq: int,
        graphs: GraphFactory,
    ) -> None:
        self.model = model
        self.planner = planner
        self.sizes = planner.sizes
        self.max_rows = planner.max_rows
        self.block_size = block_size
        self.max_blocks = max_blocks_per_seq
        self.graphs = graphs
        max_tokens = self.sizes[-1]
        device = graphs.device
        self.buffers = StaticBuffers.allocate(max_tokens, device)
        # (size, split_decode) -> (graph, output, the captured forward: run_eager_padded's)
        self.captured: dict[tuple[int, bool], tuple] = {}
        self._report = CaptureReport(
            "full mixed", self.sizes, cuda_graphs=graphs.device_type == "cuda"
        )

    def can_run(self, batch: ForwardBatch) -> str | None:
        if batch.num_tokens > self.sizes[-1]:
            return "too_many_tokens"
        if batch.batch_size > self.max_rows:
            return "too_many_rows"
        if batch.block_tables.shape[1] > self.max_blocks:
            return "context_too_long"
        if batch.return_input_logprobs:
            return "input_logprobs"
        return None

    def report(self) -> CaptureReport:
        return self._report

    # ---- capture ------------------------------------------------------------------------------

    def _static_batch(self, size: int) -> ForwardBatch:
        """A real batch of `size` tokens (on the dummy block, as piecewise capture uses; rows
        no longer than the buffers' blocks per row) whose token tensors are the static buffers
        the graph reads."""
        row_tokens = self.max_blocks * self.block_size
        rows = capture_batch(size, self.block_size, self.graphs.device, row_tokens)
        return self.buffers.view_batch(rows)

    def _forward_fn(
        self, batch: ForwardBatch, plan: ForwardPlan, split_decode: bool
    ) -> Callable[[], torch.Tensor]:
        """The captured forward of `batch` (a static batch of the captured size)."""
        backend = self.planner.attn_backend
        prologue = backend.mixed_graph_prologue(batch.num_tokens, split_decode, self.buffers.rows)

        def forward() -> torch.Tensor:
            prologue()  # the replayed batch's tokens and metadata, from its pack
            with forward_context(batch, plan, backend):
                return self.model(batch.input_ids, batch.positions)

        return forward

    @torch.inference_mode()
    def capture(self) -> CaptureReport:
        start = time.perf_counter()
        with self.graphs.capturing() as memory:
            for size in reversed(self.sizes):  # largest first: smaller ones reuse its pool
                for split_decode in (True, False):
                    warmup = self._static_batch(size)
                    plan = self.planner.plan(warmup, split_decode)
                    self._forward_fn(warmup, plan, split_decode)()
                    batch = self._static_batch(size)
                    plan = self.planner.plan(batch, split_decode)
                    forward = self._forward_fn(batch, plan, split_decode)
                    graph = self.graphs.graph()
                    output = graph.capture(forward)
                    self.captured[size, split_decode] = (graph, output, forward)
        self._report.seconds = time.perf_counter() - start
        self._report.segments_per_size = 2  # two graphs: with and without decode rows
        self._report.graph_memory_bytes = memory[0]
        logger.info(self._report.summary())
        return self._report

    # ---- replay -------------------------------------------------------------------------------

    def prepare(self, batch: ForwardBatch) -> tuple[tuple[int, bool], ForwardPlan]:
        """Persistent state for `batch`: the key of the graph to replay, and the batch's plan.
        The graph runs no Python: planning this batch rewrites the buffers it reads (its pack,
        from the device: ids that overlap scheduling fed there included; LoRA segments)."""
        key = self.planner.key(batch)
        return key, self.planner.plan(batch, split_decode=key[1])

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        return self.replay(batch, *self.prepare(batch))

    def replay(self, batch: ForwardBatch, key: tuple[int, bool], plan: ForwardPlan):
        """Replay the graph `key` for `batch`, planned by `plan` (checked first: no op inside
        the graph can check it)."""
        self.planner.check_replay(plan, batch, "FULL mixed replay")
        graph, output, _ = self.captured[key]
        n = batch.num_tokens
        # What ordinary ops read per batch (the MoE real-token count); the plan, for the CPU
        # stand-in's checks.
        with torch.inference_mode(), batch_state(n, plan):
            graph.replay()
        return output[:n]

    @torch.inference_mode()
    def run_eager_padded(self, batch: ForwardBatch) -> torch.Tensor:
        """What a replay computes, run eagerly: the captured forward of the same size over the
        same buffers and launch values. A replay must equal it bit for bit."""
        key, plan = self.prepare(batch)
        self.planner.check_replay(plan, batch, "FULL mixed forward")
        n = batch.num_tokens
        with batch_state(n, plan):
            return self.captured[key][2]()[:n].clone()
