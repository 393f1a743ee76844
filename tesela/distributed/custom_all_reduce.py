"""The custom all-reduce: small messages over NVLink peer memory instead of NCCL.

A decode step at TP=2 issues two all-reduces per layer of a few KiB each; NCCL spends about
13 us on each inside a CUDA graph, mostly protocol latency. PyTorch's symmetric memory maps
one buffer of every rank into every other rank's address space, so a reduction is a copy in,
a barrier over signal pads and a read of the peers' copies:

- `one_shot` (each rank reads every peer's whole buffer and sums) wins for the smallest
  messages, one barrier and no second pass;
- `two_shot` (reduce-scatter then all-gather through the buffers) wins from about 256 KiB;
- NCCL's ring keeps everything larger (prefill), where bandwidth, not latency, counts.

Measured on 2 x H200 inside a graph of 64 reductions of [tokens, 4096] bf16 (us per
all-reduce, NCCL / one-shot / two-shot): 1 token 12.9 / 6.7 / 8.8, 16 tokens 13.8 / 8.0 /
10.0, 32 tokens 15.1 / 9.5 / 10.1, 128 tokens 21.3 / 15.1 / 13.2, 512 tokens 40.4 / 36.5 /
25.3. The byte limits below follow those crossings. NVLink multicast (`multimem_*`) stays
off on purpose.

Off by default: inside a whole llama-3-8b decode step at TP=2 it measured no faster than
NCCL (2 x H200, runs interleaved: batch 1 4.135 / 3.904 ms against 3.905 / 3.913; batch 32
4.649 / 4.415 against 4.409 / 4.398), though faster alone (per layer 15-16 us against 20-22 at
1 token). `--custom-all-reduce` turns it on, as an experiment: in one GPU run with it on by
default, the TP engine tests with piecewise graphs failed and the FULL mixed one hung, while
the kernel test against NCCL passes. The likely cause, found later with the fused all-reduce
(fused_all_reduce.py): those tests started several TP engines in one process, and torch
numbers a process's symmetric-memory rendezvous for the life of the process, so a later
engine's rank 0 never met its fresh workers. The ranks now compare their rendezvous counts
first and keep NCCL where they differ (group.py).

The kernels synchronise through signal pads, never through the host, so they run inside
CUDA graphs; every rank must issue the same reductions in the same order, which the graph
layer already guarantees for NCCL (identical capture plans, stamped). The choice is made once
per group, agreed by every rank, and says why (`AllReduceChoice.reason`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tesela.distributed.fused_all_reduce import MAX_ROWS

logger = logging.getLogger("tesela.distributed")

ONE_SHOT_MAX_BYTES = 256 << 10
TWO_SHOT_MAX_BYTES = 4 << 20
BUFFER_BYTES = TWO_SHOT_MAX_BYTES
DTYPES = (torch.bfloat16, torch.float32)  # torch 2.11's one-shot has no fp16 kernel
MAX_WORLD_SIZE = 8  # one NVLink domain of one host


@dataclass(frozen=True)
class AllReduceChoice:
    """Which all-reduce a group uses for small messages, and why."""

    kind: str  # "symm_mem" | "nccl" | "gloo"; "fused" | "unfused" for the add + norm
    reason: str

    def __str__(self) -> str:
        return f"{self.kind} ({self.reason})"


def _peer_memory_refusal(world_size: int, env: Mapping[str, str]) -> str | None:
    """Why peer-memory collectives cannot serve this group, or None when they can: they need
    CUDA, every rank on this host (peer mappings do not cross nodes), a world of at most one
    NVLink domain and a torch with symmetric memory."""
    if world_size > MAX_WORLD_SIZE:
        return f"{world_size} ranks exceed one NVLink domain (8)"
    local = env.get("LOCAL_WORLD_SIZE")
    if local is not None and int(local) != world_size:
        return f"ranks span several hosts (LOCAL_WORLD_SIZE={local}, WORLD_SIZE={world_size})"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError as exc:
        return f"this torch has no symmetric memory ({exc})"
    return None


def choose_all_reduce(
    *, device_type: str, world_size: int, enabled: bool, env: Mapping[str, str]
) -> AllReduceChoice:
    """The small-message all-reduce (pure: tested on CPU)."""
    if device_type != "cuda":
        return AllReduceChoice("gloo", "CPU ranks reduce over gloo")
    if world_size == 1:
        return AllReduceChoice("nccl", "a single rank has nothing to reduce")
    if not enabled:
        return AllReduceChoice("nccl", "custom all-reduce off (--custom-all-reduce turns it on)")
    refusal = _peer_memory_refusal(world_size, env)
    if refusal is not None:
        return AllReduceChoice("nccl", refusal)
    return AllReduceChoice(
        "symm_mem",
        f"symmetric memory over NVLink: one-shot up to {ONE_SHOT_MAX_BYTES >> 10} KiB, "
        f"two-shot up to {TWO_SHOT_MAX_BYTES >> 20} MiB, NCCL above",
    )


def choose_all_reduce_add_norm(
    *,
    device_type: str,
    world_size: int,
    enabled: bool,
    env: Mapping[str, str],
    interpreted: bool = False,
) -> AllReduceChoice:
    """Whether decode-sized all-reduces fuse with the residual add + RMSNorm after them
    (fused_all_reduce.py), and why (pure: tested on CPU). CPU ranks run the same kernel
    under the Triton interpreter (`interpreted`: the CPU suite), over shared-memory files."""
    if world_size == 1:
        return AllReduceChoice("unfused", "a single rank has nothing to reduce")
    if not enabled:
        return AllReduceChoice("unfused", "turned off (--no-fused-all-reduce-add-norm)")
    if device_type != "cuda":
        if interpreted:
            return AllReduceChoice(
                "fused", "CPU ranks: the fused kernel under the Triton interpreter"
            )
        return AllReduceChoice("unfused", "CPU ranks reduce over gloo")
    refusal = _peer_memory_refusal(world_size, env)
    if refusal is not None:
        return AllReduceChoice("unfused", refusal)
    return AllReduceChoice(
        "fused",
        f"decode batches (<= {MAX_ROWS} tokens): all-reduce, residual add and RMSNorm in one "
        "kernel over NVLink peer memory; NCCL then the fused add + norm above",
    )


def algorithm_for(x: torch.Tensor) -> str:
    """`one_shot` | `two_shot` | `nccl` for one tensor (by its size in bytes and layout)."""
    nbytes = x.numel() * x.element_size()
    if x.dtype not in DTYPES or not x.is_contiguous() or nbytes == 0:
        return "nccl"
    if nbytes <= ONE_SHOT_MAX_BYTES:
        return "one_shot"
    if nbytes <= TWO_SHOT_MAX_BYTES:
        return "two_shot"
    return "nccl"


# Symmetric-memory rendezvous this process made (distributed/group.py compares every rank's).
_RENDEZVOUS = 0


def symmetric_rendezvous(buffer: torch.Tensor, group_name: str):
    """torch's symmetric-memory rendezvous of `buffer` over the process group `group_name` (a
    collective), counted."""
    import torch.distributed._symmetric_memory as symm_mem

    global _RENDEZVOUS
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:  # needed by torch <= 2.9, deprecated later
        enable(group_name)
    handle = symm_mem.rendezvous(buffer, group_name)
    _RENDEZVOUS += 1
    return handle


def symmetric_rendezvous_count() -> int:
    return _RENDEZVOUS


class SymmMemAllReduce:
    """One symmetric buffer of `BUFFER_BYTES` per rank, rendezvoused over the process group
    `group_name` (a collective: every rank builds it at the same point of start-up)."""

    def __init__(self, group_name: str, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group_name
        self.buffer = symm_mem.empty(BUFFER_BYTES, dtype=torch.uint8, device=device)
        self.handle = symmetric_rendezvous(self.buffer, group_name)

    def __call__(self, x: torch.Tensor) -> bool:
        """Reduce `x` in place; False (nothing done) when NCCL should take it."""
        algorithm = algorithm_for(x)
        if algorithm == "nccl":
            return False
        # Always the buffer's start: the ops find the peers' copies by the allocation.
        staged = self.buffer[: x.numel() * x.element_size()].view(x.dtype).view(x.shape)
        if algorithm == "one_shot":
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(staged, x, "sum", self.group_name, x)
        else:
            staged.copy_(x)
            torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", self.group_name)
            x.copy_(staged)
        return True
