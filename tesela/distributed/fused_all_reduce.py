"""All-reduce fused with the residual add and RMSNorm after it, over peer memory (TP decode).

Under tensor parallelism every decoder layer ends its attention and its MLP with a
row-parallel projection whose partial sums are all-reduced; the very next op is the residual
add + RMSNorm of the following sublayer. At decode batch sizes the message is a few KiB, so
NCCL's all-reduce is almost pure latency (about 7 us inside a CUDA graph on 2 x H200), it
breaks the chain of programmatic dependent launches (NCCL kernels do not take part) and the
norm is one more launch after it. `AllReduceAddNorm` does all three in one Triton kernel, one
program per token row:

  1. wait for the producer (PDL), store this rank's partial row into its own peer-visible
     buffer;
  2. barrier with every peer's program of the same row (signal pads, system-scope
     release/acquire);
  3. sum the row of every rank's buffer in rank order, in float32, rounded once to the
     activation dtype (what NCCL returns at two ranks, and the same bits on every rank at any
     size: ranks never drift apart);
  4. residual + sum (the new residual stream) and RMSNorm of it, rounded where
     `rmsnorm_kernel` rounds (tesela/layers/fused.py);
  5. a second barrier, so that no rank overwrites its buffer (the next call's step 1) while a
     peer may still read it.

The barriers pair program r of every rank through a per-(row, peer) flag: a program sets its
flag in each peer's pad (0 -> 1, release), then takes each peer's flag in its own pad back
(1 -> 0, acquire). Flags return to 0 by themselves, so the kernel needs no epoch and replays
inside CUDA graphs unchanged. Every rank must issue the same calls with the same row counts in
the same order, which the graph layer guarantees for every collective (identical capture
plans, stamped).

Where it applies (`fits`): CUDA tensors on one host, at most `MAX_ROWS` token rows (decode
batches; larger batches are bandwidth-bound and NCCL's ring is the right tool), rows of at most
`MAX_COLS` elements, float dtypes. Anything else takes NCCL followed by the fused add + norm:
the same values. The buffers are one symmetric-memory allocation per rank
(torch.distributed._symmetric_memory), mapped into every peer; nothing here uses NVLink
multicast. On CPU the same kernel runs under the Triton interpreter over plain tensors, one
thread per rank (tests/test_fused_all_reduce.py).
"""

from __future__ import annotations

import torch

from tesela.core.pdl import grid_dependency_sync, launch_kwargs

MAX_ROWS = 16  # decode-sized batches (the PDL limit): one program per row
MAX_COLS = 16384  # hidden sizes up to this
MAX_WORLD = 8
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DATA_BYTES = MAX_ROWS * MAX_COLS * 4
PAD_SLOTS = 2 * MAX_ROWS * MAX_WORLD  # (barrier, row, peer) flags, int32
BUFFER_BYTES = DATA_BYTES + PAD_SLOTS * 4


try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional on CPU: the group then never fuses
    triton = None

if triton is not None:

    @triton.jit
    def barrier(pads_ptr, slot, rank, WORLD: tl.constexpr):
        """Pair this program with program `slot` of every peer (see the module docstring)."""
        tl.debug_barrier()  # every thread's earlier accesses come before the signal
        for peer in tl.static_range(WORLD):
            if peer != rank:
                pad = tl.load(pads_ptr + peer).to(tl.pointer_type(tl.int32))
                flag = pad + slot * WORLD + rank
                while tl.atomic_cas(flag, 0, 1, sem="release", scope="sys") != 0:
                    pass
        own = tl.load(pads_ptr + rank).to(tl.pointer_type(tl.int32))
        for peer in tl.static_range(WORLD):
            if peer != rank:
                flag = own + slot * WORLD + peer
                while tl.atomic_cas(flag, 1, 0, sem="acquire", scope="sys") != 1:
                    pass
        tl.debug_barrier()  # and every thread's later accesses after it

    @triton.jit
    def all_reduce_add_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, buffers_ptr, pads_ptr,
        rank, n_cols, stride_x, stride_res, eps,
        WORLD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        dtype = x_ptr.dtype.element_ty
        offset = row * n_cols + cols  # this row's place in every rank's buffer
        grid_dependency_sync(PDL)
        own = tl.load(buffers_ptr + rank).to(tl.pointer_type(dtype))
        x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0)
        tl.store(own + offset, x, mask=mask)
        barrier(pads_ptr, row, rank, WORLD)
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for r in tl.static_range(WORLD):  # rank order: the same sum on every rank
            buffer = tl.load(buffers_ptr + r).to(tl.pointer_type(dtype))
            part = tl.load(buffer + offset, mask=mask, other=0.0, cache_modifier=".cv")
            total += part.to(tl.float32)
        reduced = total.to(dtype)  # the all-reduce's result
        res = tl.load(res_ptr + row.to(tl.int64) * stride_res + cols, mask=mask, other=0.0)
        h = (reduced.to(tl.float32) + res.to(tl.float32)).to(dtype)  # residual + x, rounded
        tl.store(res_out_ptr + row.to(tl.int64) * n_cols + cols, h, mask=mask)
        hf = h.to(tl.float32)
        variance = tl.sum(hf * hf, axis=0) / n_cols
        y = (hf * tl.rsqrt(variance + eps)).to(dtype)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        out = (w.to(tl.float32) * y.to(tl.float32)).to(dtype)
        tl.store(out_ptr + row.to(tl.int64) * n_cols + cols, out, mask=mask)
        barrier(pads_ptr, ROWS + row, rank, WORLD)  # peers are done reading our buffer


class AllReduceAddNorm:
    """The fused all-reduce + add + RMSNorm of one rank, over peer-visible buffers.

    `buffers` and `pads` hold every rank's buffer and signal-pad address (this rank's among
    them, at index `rank`); `keep` holds whatever owns that memory (a symmetric-memory handle,
    or plain tensors in the CPU tests)."""

    def __init__(
        self, buffers: list[int], pads: list[int], rank: int, device: torch.device, keep=()
    ) -> None:
        world = len(buffers)
        if not 1 <= world <= MAX_WORLD or len(pads) != world or not 0 <= rank < world:
            raise ValueError(f"{world} buffers, {len(pads)} pads, rank {rank}: not a group")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # as tensors name it: cuda:N
            device = torch.device("cuda", torch.cuda.current_device())
        self.world, self.rank, self.device = world, rank, device
        self.buffers = torch.tensor(buffers, dtype=torch.int64, device=device)
        self.pads = torch.tensor(pads, dtype=torch.int64, device=device)
        self._keep = keep
        self.launches = 0  # host-side launches (a graph capture counts once): for tests

    @classmethod
    def over_symmetric_memory(
        cls, group_name: str, device: torch.device, cpu_group
    ) -> AllReduceAddNorm:
        """One symmetric allocation per rank, rendezvoused over the group (a collective: every
        rank calls it at the same point of start-up); its signal pads zeroed on every rank
        before any rank can signal."""
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:  # needed by torch <= 2.9, a no-op later
            enable(group_name)
        buffer = symm_mem.empty(BUFFER_BYTES, dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(buffer, group_name)
        buffer.zero_()
        torch.cuda.synchronize(device)
        dist.barrier(group=cpu_group)
        bases = [int(p) for p in handle.buffer_ptrs]
        return cls(
            bases, [b + DATA_BYTES for b in bases], handle.rank, device, keep=(buffer, handle)
        )

    def fits(self, x: torch.Tensor) -> bool:
        """Whether `x` (this rank's partial sums) takes the fused kernel; the same answer on
        every rank, since every rank runs the same shapes."""
        return (
            x.device == self.device
            and x.dim() == 2
            and 0 < x.shape[0] <= MAX_ROWS
            and x.shape[1] <= MAX_COLS
            and x.dtype in DTYPES
            and x.stride(1) == 1
        )

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(residual + all-reduce(x)) * weight, residual + all-reduce(x))."""
        assert self.fits(x) and residual.shape == x.shape and residual.stride(1) == 1
        m, n = x.shape
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        new_residual = torch.empty_like(out)
        block = 1 << (n - 1).bit_length()
        self.launches += 1
        all_reduce_add_norm_kernel[(m,)](
            x, residual, weight, out, new_residual, self.buffers, self.pads,
            self.rank, n, x.stride(0), residual.stride(0), eps,
            WORLD=self.world, ROWS=MAX_ROWS, BLOCK=block,
            num_warps=4 if n <= 2048 else 8, **launch_kwargs(x.device, m),
        )  # fmt: skip
        return out, new_residual
