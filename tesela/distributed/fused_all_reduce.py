"""All-reduce fused with the residual add and RMSNorm after it, over peer memory (TP decode).

Under tensor parallelism every decoder layer ends its attention and its MLP with a
row-parallel projection whose partial sums are all-reduced; the very next op is the residual
add + RMSNorm of the following sublayer. At decode batch sizes the message is a few KiB, so
NCCL's all-reduce is almost pure latency (about 7 us inside a CUDA graph on 2 x H200), it
breaks the chain of programmatic dependent launches (NCCL kernels do not take part) and the
norm is one more launch after it. `AllReduceAddNorm` does all three in one Triton kernel, one
program per token row, with no barrier round trip: the data words are their own flags
(the "Lamport" one-shot all-reduce).

Every rank's buffer has three slots; a slot holds, per peer p and row r, the row p pushed.
A word of all ones is "not written yet" (a NaN that pushed data never carries: such words are
replaced by the canonical NaN). Call k of a row uses slot k % 3 (each row counts its calls in
`counters`, identical on every rank since every rank makes the same calls):

  1. wait for the producer (PDL); set this rank's rows of slot (k - 1) % 3 back to all ones
     (the peers wrote them in call k - 1 and this rank read them then);
  2. push the partial row into every rank's slot k % 3 (its own included), at this rank's
     place;
  3. read slot k % 3 of its own buffer until no word of any rank's row is all ones (or, after
     a millisecond of waiting, until the host raises the abort flag: `abort`, called by the
     engine's watchdog when a peer died or hung, so that this GPU stops waiting), and sum
     the rows in rank order, in float32, rounded once to the activation dtype (what NCCL
     returns at two ranks, and the same bits on every rank at any size);
  4. residual + sum (the new residual stream) and RMSNorm of it, rounded where
     `rmsnorm_kernel` rounds (tesela/layers/fused.py); count the call.

Why step 1 needs no fence: every peer's call-(k - 1) words in that slot arrived before this
rank finished call k - 1. A peer writes the slot again in its call k + 2, which it starts only
after it read this rank's push of call k + 1; that push comes from a later kernel than the
clear, and a kernel starts its pushes only after the grids before it completed and their
writes became visible (the PDL wait). A third slot is what buys that kernel boundary: with two,
the clear and the push that lets peers reuse the slot sit in one kernel, and need a
system-scope fence between them (about a microsecond on every call).

Where it applies (`fits`): CUDA tensors on one host, at most `MAX_ROWS` token rows (decode
batches; larger batches are bandwidth-bound and NCCL's ring is the right tool), and the row
width and dtype of the first fused call (the model's hidden size and dtype: a slot cleared for
one word size would not read as cleared in another). Anything else takes NCCL followed by the
fused add + norm: the same values. The buffers are one symmetric-memory allocation per rank
(torch.distributed._symmetric_memory), mapped into every peer; nothing here uses NVLink
multicast. On CPU the same kernel runs under the Triton interpreter, one process per rank over
shared-memory buffers (tests/test_fused_all_reduce.py).
"""

from __future__ import annotations

import os
import sys
import uuid

import torch

from tesela.core.pdl import grid_dependency_sync, launch_kwargs

# Decode-sized batches: one program per row. At 32 rows the kernel still beats NCCL + add-norm
# (llama-3-8b TP=2 decode step at batch 32 on 2 x H200: 4.23-4.28 ms against 4.41-4.56 with
# NCCL, measured with PDL up to 16 rows).
MAX_ROWS = 32
# This kernel launches with PDL (tesela/core/pdl.py) up to PDL_ROWS rows only: its two-card
# tests and timings ran with PDL at those counts, and no further.
PDL_ROWS = 16
MAX_COLS = 16384  # hidden sizes up to this
MAX_WORLD = 8

# How long a rank waits for a peer's row before it also watches the host's abort flag.
POLL_AFTER_NS = 1_000_000
SLOTS = 3
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Bits of the canonical quiet NaN a pushed all-ones word becomes, per word size.
CANONICAL_NAN = {torch.bfloat16: 0x7FC0, torch.float16: 0x7E00, torch.float32: 0x7FC00000}


def _pdl_tokens(rows: int) -> int:
    """The token count this kernel's launch asks PDL about: above PDL_ROWS, one no launch gets
    PDL for."""
    return rows if rows <= PDL_ROWS else sys.maxsize


def buffer_bytes(world: int) -> int:
    """One rank's buffer: SLOTS x world x MAX_ROWS rows of MAX_COLS words of up to 4 bytes."""
    return SLOTS * world * MAX_ROWS * MAX_COLS * 4


try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional on CPU: the group then never fuses
    triton = None

if triton is not None:

    @triton.jit
    def nanoseconds(COMPILED: tl.constexpr):
        """The GPU's global timer (0 under the interpreter, which has none)."""
        if COMPILED:
            return tl.inline_asm_elementwise(
                "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
            )
        else:
            return tl.full((), 0, tl.int64)

    @triton.jit
    def waited_long(start, POLL_NS: tl.constexpr, COMPILED: tl.constexpr):
        """Whether a wait begun at `start` outlasted POLL_NS; always under the interpreter (it
        has no timer, and no bandwidth to save)."""
        if COMPILED:
            return nanoseconds(COMPILED) - start > POLL_NS
        else:
            return tl.full((), 1, tl.int1)

    @triton.jit
    def all_reduce_add_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, buffers_ptr, counters_ptr,
        rank, n_cols, stride_x, stride_res, eps, canonical_nan,
        WORLD: tl.constexpr, SLOT_COUNT: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
        WORD: tl.constexpr,
        BLOCK: tl.constexpr, COMPILED: tl.constexpr, POLL_NS: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        dtype = x_ptr.dtype.element_ty
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)  # a weight: loaded while the producer ends
        grid_dependency_sync(PDL)
        own = tl.load(buffers_ptr + rank).to(tl.pointer_type(WORD))
        abort_at = tl.load(buffers_ptr + WORLD).to(tl.pointer_type(tl.int32))
        call = tl.load(counters_ptr + row)
        slot, cleared = call % SLOT_COUNT, (call + SLOT_COUNT - 1) % SLOT_COUNT
        rows_of = WORLD * ROWS * COLS  # words per slot
        unwritten = tl.full((BLOCK,), -1, dtype=WORD)
        # 1. The rows peers pushed in the previous call, read then: "not written" again.
        for p in tl.static_range(WORLD):
            place = cleared * rows_of + (p * ROWS + row) * COLS
            tl.store(own + place + cols, unwritten, mask=mask)
        # 2. Push this rank's partial row into every rank's slot.
        x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0)
        word = x.to(WORD, bitcast=True)
        word = tl.where(word == -1, canonical_nan.to(WORD), word)
        mine = slot * rows_of + (rank * ROWS + row) * COLS
        for p in tl.static_range(WORLD):
            buffer = tl.load(buffers_ptr + p).to(tl.pointer_type(WORD))
            tl.store(buffer + mine + cols, word, mask=mask)
        # 3. Every rank's row, once all of its words arrived; summed in rank order. A wait
        # longer than POLL_NS also reads the host's abort flag (over PCIe, so not
        # sooner): a dead or hung peer must not hold this GPU for ever.
        start = nanoseconds(COMPILED)
        aborted = tl.full((), 0, tl.int32)
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for p in tl.static_range(WORLD):
            at = own + slot * rows_of + (p * ROWS + row) * COLS + cols
            got = tl.load(at, mask=mask, other=0, volatile=True)
            while (tl.sum(((got == -1) & mask).to(tl.int32), axis=0) > 0) & (aborted == 0):
                got = tl.load(at, mask=mask, other=0, volatile=True)
                if waited_long(start, POLL_NS, COMPILED):
                    aborted = tl.load(abort_at, volatile=True)
            total += got.to(dtype, bitcast=True).to(tl.float32)
        reduced = total.to(dtype)  # the all-reduce's result
        # 4. The residual add and the norm, then count the call.
        res = tl.load(res_ptr + row.to(tl.int64) * stride_res + cols, mask=mask, other=0.0)
        h = (reduced.to(tl.float32) + res.to(tl.float32)).to(dtype)  # residual + x, rounded
        tl.store(res_out_ptr + row.to(tl.int64) * n_cols + cols, h, mask=mask)
        hf = h.to(tl.float32)
        variance = tl.sum(hf * hf, axis=0) / n_cols
        y = (hf * tl.rsqrt(variance + eps)).to(dtype)
        out = (w.to(tl.float32) * y.to(tl.float32)).to(dtype)
        tl.store(out_ptr + row.to(tl.int64) * n_cols + cols, out, mask=mask)
        tl.store(counters_ptr + row, call + 1)


def kernel_interpreted() -> bool:
    """Whether the kernel runs under Triton's interpreter (CPU tensors), False without Triton."""
    return triton is not None and not isinstance(
        all_reduce_add_norm_kernel, triton.runtime.JITFunction
    )


class AllReduceAddNorm:
    """The fused all-reduce + add + RMSNorm of one rank, over peer-visible buffers.

    `buffers` holds every rank's buffer address (this rank's at index `rank`), each of
    `buffer_bytes(world)` bytes filled with 0xFF before any rank's first call; `keep` holds
    whatever owns that memory (a symmetric-memory handle, or shared tensors in the CPU
    tests)."""

    def __init__(self, buffers: list[int], rank: int, device: torch.device, keep=()) -> None:
        world = len(buffers)
        if not 1 <= world <= MAX_WORLD or not 0 <= rank < world:
            raise ValueError(f"{world} buffers, rank {rank}: not a group")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # as tensors name it: cuda:N
            device = torch.device("cuda", torch.cuda.current_device())
        self.world, self.rank, self.device = world, rank, device
        # Set by abort() (the engine's watchdog, when a peer died or hung): waiting kernels
        # give up. Host memory the GPU reads directly (pinned, unified addressing).
        self.abort_flag = torch.zeros(1, dtype=torch.int32, pin_memory=device.type == "cuda")
        # Every rank's buffer, then the abort flag: the kernel finds all of them here.
        addresses = [*buffers, self.abort_flag.data_ptr()]
        self.buffers = torch.tensor(addresses, dtype=torch.int64, device=device)
        self.counters = torch.zeros(MAX_ROWS, dtype=torch.int32, device=device)
        self.row = None  # (width, dtype): fixed by the first fused call
        self._keep = keep
        self.launches = 0  # host-side launches (a graph capture counts once): for tests

    @classmethod
    def over_symmetric_memory(
        cls, group_name: str, device: torch.device, cpu_group
    ) -> AllReduceAddNorm:
        """One symmetric allocation per rank, rendezvoused over the process group `group_name`
        (a collective: every rank calls it at the same point of start-up), marked unwritten on
        every rank before any rank can push."""
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        from tesela.distributed.custom_all_reduce import symmetric_rendezvous

        world = dist.get_world_size(cpu_group)
        buffer = symm_mem.empty(buffer_bytes(world), dtype=torch.uint8, device=device)
        handle = symmetric_rendezvous(buffer, group_name)
        buffer.fill_(0xFF)
        torch.cuda.synchronize(device)
        dist.barrier(group=cpu_group)
        bases = [int(p) for p in handle.buffer_ptrs]
        return cls(bases, handle.rank, device, keep=(buffer, handle))

    @classmethod
    def over_shared_memory(cls, rank: int, world: int, all_gather_object) -> AllReduceAddNorm:
        """CPU ranks under the Triton interpreter: one shared-memory file per rank, mapped by
        every rank (a collective: `all_gather_object` exchanges the names, and a second call
        waits until every rank mapped every file, after which the names can go)."""
        nbytes = buffer_bytes(world)
        name = f"/dev/shm/tesela-all-reduce-{os.getpid()}-{uuid.uuid4().hex}"
        own = torch.from_file(name, shared=True, size=nbytes, dtype=torch.uint8)
        own.fill_(0xFF)
        names = all_gather_object(name)
        buffers = [
            own if r == rank else torch.from_file(n, shared=True, size=nbytes, dtype=torch.uint8)
            for r, n in enumerate(names)
        ]
        all_gather_object(None)
        os.unlink(name)  # the mappings stay
        return cls([b.data_ptr() for b in buffers], rank, "cpu", keep=buffers)

    def abort(self) -> None:
        """Make every waiting and future call return without its peers' rows (its results are
        garbage): for an engine that is failing anyway, so that the host's wait for this GPU
        ends."""
        self.abort_flag.fill_(1)

    def fits(self, x: torch.Tensor) -> bool:
        """Whether `x` (this rank's partial sums) takes the fused kernel; the same answer on
        every rank, since every rank runs the same shapes in the same order."""
        return (
            x.device == self.device
            and x.dim() == 2
            and 0 < x.shape[0] <= MAX_ROWS
            and x.shape[1] <= MAX_COLS
            and x.dtype in DTYPES
            and x.stride(1) == 1
            and self.row in (None, (x.shape[1], x.dtype))
        )

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(residual + all-reduce(x)) * weight, residual + all-reduce(x))."""
        assert self.fits(x) and residual.shape == x.shape and residual.stride(1) == 1
        m, n = x.shape
        self.row = (n, x.dtype)
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        new_residual = torch.empty_like(out)
        block = 1 << (n - 1).bit_length()
        word = {2: tl.int16, 4: tl.int32}[x.element_size()]
        self.launches += 1
        all_reduce_add_norm_kernel[(m,)](
            x, residual, weight, out, new_residual, self.buffers, self.counters,
            self.rank, n, x.stride(0), residual.stride(0), eps, CANONICAL_NAN[x.dtype],
            WORLD=self.world, SLOT_COUNT=SLOTS, ROWS=MAX_ROWS, COLS=MAX_COLS, WORD=word, BLOCK=block,
            COMPILED=not kernel_interpreted(), POLL_NS=POLL_AFTER_NS,
            num_warps=4 if n <= 2048 else 8, **launch_kwargs(x.device, _pdl_tokens(m)),
        )  # fmt: skip
        return out, new_residual
