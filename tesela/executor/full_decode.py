"""FULL decode graphs: the whole forward of a decode batch, attention inside, per batch size.

Decode batches have one token per row, so their shapes depend only on the row count: each size
of the ladder is captured once. Its plan comes from a `CudaGraphPlanner`, whose attention
metadata views the backend's persistent buffers. The host does no per-row work for a replay:
planning the batch copies its pack (its tokens, lengths and block tables, which
`ForwardBatch.build` uploaded in one buffer) into the backend's buffers, one device-to-device
copy, and the smallest captured size that fits is replayed; the graph's first op
(`decode_graph_prologue`) writes the tokens, positions and KV slots into the static buffers the
model reads and the lengths and block tables into the attention buffers, and makes the rows
past the batch's padding rows: token 0, position 0, the dummy KV slot and a length-1 context
on the dummy block.

With `vocab_size` given, each size also gets sampling graphs, one per `SamplingVariant`: the LM
head over the forward graph's output and `tesela.executor.sampling.sample`, reading per-row
parameters from persistent `SamplingTensors` that `run_sample` rewrites before the replay. A
decode step is then two replays and no host sync: the sampled tokens stay on the device.

Warmup, capture and replay are the same code on every device; on CPU the graph is the
`CpuGraph` stand-in (tesela/executor/graphs.py), which re-runs the captured forward over the
same static buffers and persistent metadata, so padding and buffer reuse are tested on CPU.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import torch

from tesela.core.forward_batch import ForwardBatch, ForwardMode
from tesela.core.forward_context import batch_state, forward_context
from tesela.core.plan import ForwardPlan
from tesela.executor.buffers import StaticBuffers
from tesela.executor.graph_runner import CaptureReport, GraphRunner
from tesela.executor.graphs import GraphFactory
from tesela.executor.planner import CudaGraphPlanner
from tesela.executor.sampling import (
    SampleOutput,
    SamplingTensors,
    SamplingVariant,
    prepare_vocab_keys,
    sample,
)

logger = logging.getLogger("tesela.full_decode")


class FullDecodeRunner(GraphRunner):
    name = "full decode"
    resolves_feed = True  # the graph's first kernel reads fed ids from `fed_tokens`

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        planner: CudaGraphPlanner,
        batch_sizes: tuple[int, ...],
        max_blocks_per_seq: int,
        graphs: GraphFactory,
        vocab_size: int | None = None,
        max_sampled_rows: int = 0,
    ) -> None:
        """`max_sampled_rows`: the most rows any step samples (the scheduler's max_num_seqs),
        which a decode batch's fed ids may name; at least the largest captured size."""
        self.model = model
        self.planner = planner
        self.sizes = tuple(batch_sizes)
        self.max_blocks = max_blocks_per_seq
        self.graphs = graphs
        device = graphs.device
        max_bs = self.sizes[-1]
        self.buffers = StaticBuffers.allocate(max_bs, device)
        # The sampled tokens of the last step these graphs sampled (every sampling graph writes
        # its tokens here), which the next batch's fed ids read (overlap scheduling).
        self.fed_tokens = torch.zeros(
            max(max_bs, max_sampled_rows), dtype=torch.int64, device=device
        )
        self.captured: dict[int, tuple] = {}  # size -> (graph, output)
        self.vocab_size = vocab_size
        self.sampling = (
            SamplingTensors.empty(max_bs, vocab_size, device) if vocab_size is not None else None
        )
        self.sample_graphs: dict[tuple[int, SamplingVariant], tuple] = {}
        self._report = CaptureReport(
            "full decode", self.sizes, cuda_graphs=graphs.device_type == "cuda"
        )

    def can_run(self, batch: ForwardBatch) -> str | None:
        if not batch.mode.is_decode:
            return "not_decode"
        if batch.batch_size > self.sizes[-1]:
            return "decode_batch_too_large"
        if batch.block_tables.shape[1] > self.max_blocks:
            return "context_too_long"
        if batch.return_input_logprobs:
            return "input_logprobs"
        return None

    def report(self) -> CaptureReport:
        return self._report

    @property
    def pack_buffer(self) -> torch.Tensor | None:
        """Where to build decode batches (`ForwardBatch.build(into=...)`): the buffer the
        graphs' first kernel reads packs from, so a replay's planning copies nothing."""
        return self.planner.attn_backend.decode_pack_buffer()

    def _static_batch(self, size: int) -> ForwardBatch:
        """A decode batch whose token tensors are the static buffers (what graphs read)."""
        device = self.graphs.device
        zeros = torch.zeros(size, dtype=torch.int32, device=device)
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=self.buffers.input_ids[:size],
            positions=self.buffers.positions[:size],
            out_cache_loc=self.buffers.out_cache_loc[:size],
            token_rows=self.buffers.rows[:, :size],
            seq_lens=zeros + 1,
            prefix_lens=zeros,
            extend_start_loc=torch.arange(size, dtype=torch.int32, device=device),
            block_tables=torch.zeros((size, 1), dtype=torch.int32, device=device),
            logits_indices=torch.arange(size, device=device),
            seq_lens_cpu=[1] * size,
            prefix_lens_cpu=[0] * size,
        )

    def _forward_fn(self, batch: ForwardBatch, plan: ForwardPlan) -> Callable[[], torch.Tensor]:
        """The captured forward of `batch` (a static batch of the captured size)."""
        backend = self.planner.attn_backend
        prologue = backend.decode_graph_prologue(
            batch.batch_size, self.buffers.rows, self.fed_tokens
        )

        def forward() -> torch.Tensor:
            prologue()  # the replayed batch's tokens, lengths and block tables, from its pack
            with forward_context(batch, plan, backend):
                return self.model(batch.input_ids, batch.positions)

        return forward

    @torch.inference_mode()
    def capture(self) -> CaptureReport:
        start = time.perf_counter()
        with self.graphs.capturing() as memory:
            for size in reversed(self.sizes):
                warmup = self._static_batch(size)
                self._forward_fn(warmup, self.planner.plan(warmup))()
                batch = self._static_batch(size)
                graph = self.graphs.graph()
                output = graph.capture(self._forward_fn(batch, self.planner.plan(batch)))
                self.captured[size] = (graph, output)
                self._capture_sampling(size, output)
        self._report.seconds = time.perf_counter() - start
        self._report.segments_per_size = 1
        self._report.graph_memory_bytes = memory[0]
        logger.info(self._report.summary())
        return self._report

    def _capture_sampling(self, size: int, hidden_states: torch.Tensor) -> None:
        if self.sampling is None:
            return
        prepare_vocab_keys(self.vocab_size, self.graphs.device)
        tensors = self.sampling.rows(size)
        for variant in SamplingVariant.all():

            def head(variant=variant):
                # The tokens land where the next step's fed ids come from.
                fed = self.fed_tokens[:size]
                out = sample(self.model.compute_logits(hidden_states), tensors, variant, out=fed)
                # A tuple, so the CPU stand-in's replay finds the tensors to refresh.
                return tuple(out.fields())

            head()  # warmup: lazy kernel setup happens outside the capture
            graph = self.graphs.graph()
            self.sample_graphs[size, variant] = (graph, SampleOutput(*graph.capture(head)))

    @property
    def samples_in_graph(self) -> bool:
        return self.sampling is not None

    def can_sample(self, batch: ForwardBatch) -> bool:
        """Whether `run_sample` serves `batch`: its sampling graphs draw a token for every row,
        and a decode batch can hold a row that draws none (a one-token recompute chunk short of
        its sequence's end, under a small token budget); such a batch samples from the logits
        of the rows that do."""
        return self.samples_in_graph and batch.logits_indices.shape[0] == batch.batch_size

    @torch.inference_mode()
    def run_sample(
        self, batch: ForwardBatch, tensors: SamplingTensors | None, variant: SamplingVariant
    ) -> SampleOutput:
        """Forward, LM head and sampling of a decode batch (every row samples), all replayed;
        the result stays on the device."""
        variant.check_tensors(tensors)  # before any static buffer is touched
        self.run(batch)
        n = batch.batch_size
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        if variant.reads_tensors:  # a greedy variant's graph reads none: nothing to copy
            self.sampling.copy_(tensors)  # rows past n keep earlier, valid values: padding
        graph, output = self.sample_graphs[size, variant]
        graph.replay()
        return output.rows(n)

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        reason = self.can_run(batch)
        if reason is not None:  # before any static buffer is touched
            raise ValueError(
                f"the FULL decode graph runner cannot serve {batch.stamp} ({reason}): run "
                "batches through the dispatcher (tesela/executor/dispatcher.py), which asks "
                "can_run first and falls to the piecewise or eager path"
            )
        n = batch.batch_size
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        if batch.feed_dst is not None:
            self._stage_fed_tokens(batch)
        # The graph runs no Python: planning this batch copies in the pack its first kernel
        # reads, and no op inside it can check the plan, so the runner does.
        plan = self.planner.plan(batch)
        self.planner.check_replay(plan, batch, "FULL decode replay")
        graph, output = self.captured[size]
        with batch_state(n, plan):  # what ordinary ops read per batch (the MoE token count)
            graph.replay()
        return output[:n]

    def _stage_fed_tokens(self, batch: ForwardBatch) -> None:
        """Make `fed_tokens` hold the tokens `batch`'s fed ids come from (overlap scheduling:
        the step still in flight). A step these graphs sampled wrote them there already (its
        tokens are a view of the buffer); one sampled elsewhere (eager, FULL mixed) is copied
        in, on the stream before the replay."""
        source = batch.fed_from
        if source is None:
            raise ValueError(
                f"{batch.stamp} feeds token ids from a step in flight but names no tokens to "
                "feed from: set its fed_from (ModelRunner does, from the `feed` argument)"
            )
        if source.data_ptr() != self.fed_tokens.data_ptr():
            if source.numel() > self.fed_tokens.numel():
                raise ValueError(
                    f"{batch.stamp} feeds from a step that sampled {source.numel()} rows, but "
                    f"the FULL decode runner keeps {self.fed_tokens.numel()}: build it with "
                    "max_sampled_rows = the scheduler's max_num_seqs"
                )
            self.fed_tokens[: source.numel()].copy_(source)
