"""The tensor-parallel group: start-up from the torch.distributed environment, collectives.

A `TPGroup` is a plain value (rank, size, name) handed to every layer that shards; layers call
`all_reduce_` / `all_gather`, which are registered custom ops so that torch.compile keeps them
as single opaque nodes and CUDA graphs capture them (a plain NCCL all-reduce is capturable once
its communicator exists, which the eager warmup before every capture guarantees). Custom ops
take only plain arguments, so they find the torch ProcessGroup by the group's name in
`_PROCESS_GROUPS`, filled once by `init_distributed`.

Start-up reads the standard rendezvous variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
LOCAL_RANK), exactly what torchrun sets, so multi-node launches use the usual tooling. Two
groups are made: the compute group (NCCL on CUDA, gloo on CPU) and a gloo group on the host
for small control exchanges (capture plans, KV sizes) that must not touch the GPU stream.
On CUDA, small all-reduces take the custom all-reduce over NVLink peer memory
(`custom_all_reduce.py`) when every rank can, NCCL otherwise; the group says which and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tesela.distributed.custom_all_reduce import (
    AllReduceChoice,
    SymmMemAllReduce,
    choose_all_reduce,
    choose_all_reduce_add_norm,
    symmetric_rendezvous_count,
)
from tesela.distributed.fused_all_reduce import AllReduceAddNorm, kernel_interpreted

logger = logging.getLogger("tesela.distributed")
_PROCESS_GROUPS: dict[str, dist.ProcessGroup] = {}
# The custom all-reduce of a group (by name), where every rank set one up.
_CUSTOM_ALL_REDUCE: dict[str, SymmMemAllReduce] = {}
# The fused all-reduce + residual add + RMSNorm of a group (by name), where every rank set one up.
_ALL_REDUCE_ADD_NORM: dict[str, AllReduceAddNorm] = {}
RENDEZVOUS_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class TPGroup:
    """This process's place in the tensor-parallel group (size 1: no collectives at all)."""

    rank: int = 0
    size: int = 1
    name: str = ""  # key of the compute ProcessGroup; its host twin is f"{name}:cpu"
    # How small all-reduces travel ("symm_mem", "nccl", "gloo"; "" for a single rank), and why.
    all_reduce: AllReduceChoice | None = None
    # Whether decode-sized all-reduces fuse with the add + RMSNorm after them, and why.
    all_reduce_add_norm: AllReduceChoice | None = None

    def __post_init__(self) -> None:
        assert 0 <= self.rank < self.size, (self.rank, self.size)

    @property
    def process_group(self) -> dist.ProcessGroup:
        return _PROCESS_GROUPS[self.name]

    @property
    def cpu_group(self) -> dist.ProcessGroup:
        return _PROCESS_GROUPS[f"{self.name}:cpu"]

    def describe(self) -> dict:
        """The group as `engine.stats()` shows it: size, how all-reduces travel and whether
        decode batches' all-reduce fuses with the add + norm (each with why), and how many
        times this rank launched the fused kernel from the host (a graph capture counts once,
        its replays not at all)."""
        if self.size == 1:
            return {"size": 1}
        fused = _ALL_REDUCE_ADD_NORM.get(self.name)
        return {
            "size": self.size,
            "all_reduce": str(self.all_reduce),
            "all_reduce_add_norm": str(self.all_reduce_add_norm),
            "fused_all_reduce_add_norm_launches": 0 if fused is None else fused.launches,
        }

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; returns `x`."""
        if self.size > 1:
            torch.ops.tesela.all_reduce_(x, self.name)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along the last dimension, in rank order."""
        if self.size == 1:
            return x
        return torch.ops.tesela.all_gather(x, self.name, self.size)

    def all_gather_object(self, obj) -> list:
        """Every rank's picklable `obj`, in rank order, over the host group."""
        if self.size == 1:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def check_same(self, value, what: str) -> None:
        """Raise unless every rank passes an equal `value` (e.g. its capture plan): ranks that
        capture different sizes, or in another order, would pair collectives wrongly and hang
        or corrupt each other."""
        values = self.all_gather_object(value)
        differ = [rank for rank, v in enumerate(values) if v != values[0]]
        if differ:
            raise RuntimeError(
                f"tensor-parallel ranks disagree on {what}: rank 0 has {values[0]!r}, rank "
                f"{differ[0]} has {values[differ[0]]!r}; every rank must run the same "
                "configuration (capture sizes, graph modes, model)"
            )

    def min_int(self, value: int) -> int:
        """The smallest `value` over the ranks (e.g. KV blocks every rank can hold)."""
        return min(self.all_gather_object(int(value)))


SINGLE = TPGroup()


def rendezvous_env(rank: int, world_size: int, port: int, addr: str = "127.0.0.1") -> dict:
    """The variables torchrun would set for `rank` of a single-host group."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": addr,
        "MASTER_PORT": str(port),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(
    *,
    device: torch.device | str,
    timeout_s: float = 60.0,
    name: str = "tp",
    env: Mapping[str, str] | None = None,
    custom_all_reduce: bool = False,
    fused_all_reduce_add_norm: bool = True,
) -> TPGroup:
    """Join the process group described by the rendezvous environment; the whole world is one
    tensor-parallel group. NCCL on CUDA (the device is cuda:LOCAL_RANK), gloo on CPU.
    `timeout_s` bounds every collective: a peer that hangs fails the group, not stalls it.
    `env` (default: os.environ) holds the rendezvous variables. `custom_all_reduce` allows
    the symmetric-memory all-reduce for small messages where every rank can use it;
    `fused_all_reduce_add_norm` the all-reduce + add + RMSNorm kernel for decode batches."""
    env = os.environ if env is None else env
    missing = [k for k in RENDEZVOUS_ENV if k not in env]
    if missing:
        raise RuntimeError(
            f"tensor parallelism needs the torch.distributed rendezvous variables; missing "
            f"{', '.join(missing)}: launch with torchrun or set RANK, WORLD_SIZE, MASTER_ADDR "
            "and MASTER_PORT"
        )
    rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
    device = torch.device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(env.get("LOCAL_RANK", rank)))
    if dist.is_initialized():
        raise RuntimeError(
            "this process already belongs to a tensor-parallel group: shut the running engine "
            "down (LLM.shutdown()) before starting another"
        )
    dist.init_process_group(
        backend,
        init_method=f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
        rank=rank,
        world_size=size,
        timeout=timeout,
    )
    _PROCESS_GROUPS[name] = dist.group.WORLD
    _PROCESS_GROUPS[f"{name}:cpu"] = (
        dist.new_group(backend="gloo", timeout=timeout)
        if device.type == "cuda"
        else dist.group.WORLD
    )
    group = TPGroup(rank, size, name)
    choice = _set_up_all_reduce(group, device, custom_all_reduce, env)
    fused = _set_up_all_reduce_add_norm(group, device, fused_all_reduce_add_norm, env)
    return dataclasses.replace(group, all_reduce=choice, all_reduce_add_norm=fused)


def _symmetric_memory_blocked(group: TPGroup) -> str | None:
    """Why the ranks cannot set up peer memory now, or None (a collective).

    torch numbers a process's symmetric-memory rendezvous exchanges from the first one, for
    the life of the process, and ranks meet under those numbers. Rank 0 lives in the engine's
    process: after an earlier engine there made one, its numbers run ahead of its fresh
    workers' and the rendezvous never completes. Every rank then keeps NCCL."""
    counts = group.all_gather_object(symmetric_rendezvous_count())
    if len(set(counts)) == 1:
        return None
    return (
        f"an earlier engine in this process set up peer memory (rendezvous per rank: {counts}; "
        "torch numbers them per process): start the engine in a fresh process to use it"
    )


def _set_up_all_reduce(
    group: TPGroup, device: torch.device, enabled: bool, env: Mapping[str, str]
) -> AllReduceChoice:
    """Agree on the small-message all-reduce: the custom one only if every rank chose it (a
    rank on NCCL beside one on peer memory would pair nothing and hang)."""
    choice = choose_all_reduce(
        device_type=device.type, world_size=group.size, enabled=enabled, env=env
    )
    kinds = group.all_gather_object(choice.kind)
    if choice.kind == "symm_mem" and any(kind != "symm_mem" for kind in kinds):
        choice = AllReduceChoice("nccl", f"not every rank can use symmetric memory ({kinds})")
    if choice.kind == "symm_mem" and (blocked := _symmetric_memory_blocked(group)):
        choice = AllReduceChoice("nccl", blocked)
    if choice.kind == "symm_mem":
        process_group = group.process_group
        _CUSTOM_ALL_REDUCE[group.name] = SymmMemAllReduce(process_group.group_name, device)
    if group.rank == 0:
        logger.info("tensor-parallel all-reduce: %s", choice)
    return choice


def _set_up_all_reduce_add_norm(
    group: TPGroup, device: torch.device, enabled: bool, env: Mapping[str, str]
) -> AllReduceChoice:
    """Agree on the fused all-reduce + add + norm: only if every rank can (a rank running the
    kernel beside one on NCCL would wait for its peers' rows for ever)."""
    choice = choose_all_reduce_add_norm(
        device_type=device.type,
        world_size=group.size,
        enabled=enabled,
        env=env,
        interpreted=kernel_interpreted(),
    )
    kinds = group.all_gather_object(choice.kind)
    if choice.kind == "fused" and any(kind != "fused" for kind in kinds):
        choice = AllReduceChoice("unfused", f"not every rank can fuse ({kinds})")
    on_gpus = device.type == "cuda"
    if choice.kind == "fused" and on_gpus and (blocked := _symmetric_memory_blocked(group)):
        choice = AllReduceChoice("unfused", blocked)
    if choice.kind == "fused":
        _ALL_REDUCE_ADD_NORM[group.name] = (
            AllReduceAddNorm.over_symmetric_memory(
                group.process_group.group_name, device, group.cpu_group
            )
            if on_gpus
            else AllReduceAddNorm.over_shared_memory(
                group.rank, group.size, group.all_gather_object
            )
        )
    if group.rank == 0:
        logger.info("tensor-parallel all-reduce + add + norm: %s", choice)
    return choice


def destroy_distributed(*, barrier: bool = True) -> None:
    """Leave the process group (idempotent). A clean shutdown waits for every rank first: the
    rank hosting the rendezvous store must not leave while others still talk to it. Free the
    rank's CUDA graphs before this (ModelRunner.release_cuda_graphs): NCCL's teardown blocks
    while graphs that captured its collectives are alive."""
    _CUSTOM_ALL_REDUCE.clear()  # its peer mappings go before the group they were made over
    _ALL_REDUCE_ADD_NORM.clear()
    if dist.is_initialized():
        if barrier:
            dist.barrier(group=_PROCESS_GROUPS.get("tp:cpu"))
        dist.destroy_process_group()
    _PROCESS_GROUPS.clear()


def abort_distributed(*, nccl: bool = True) -> None:
    """Abort pending collectives so a thread blocked on a dead peer returns (best effort):
    the fused all-reduce kernels stop waiting, and (`nccl`) the communicators are aborted."""
    for kernel in list(_ALL_REDUCE_ADD_NORM.values()):
        kernel.abort()
    if not nccl:
        return
    for group in list(_PROCESS_GROUPS.values()):
        with contextlib.suppress(Exception):  # aborting is best effort by nature
            dist.distributed_c10d._abort_process_group(group)


@torch.library.custom_op("tesela::all_reduce_", mutates_args=("x",))
def _all_reduce_(x: torch.Tensor, group_name: str) -> None:
    custom = _CUSTOM_ALL_REDUCE.get(group_name)
    if custom is not None and custom(x):
        return
    dist.all_reduce(x, group=_PROCESS_GROUPS[group_name])


@_all_reduce_.register_fake
def _(x, group_name) -> None:
    return None


def all_reduce_add_norm_kernel(group_name: str) -> AllReduceAddNorm | None:
    """The group's fused all-reduce + add + RMSNorm, where every rank set it up (the op in
    tesela/layers/norm.py decides per call whether a tensor takes it)."""
    return _ALL_REDUCE_ADD_NORM.get(group_name)


@torch.library.custom_op("tesela::all_gather", mutates_args=())
def _all_gather(x: torch.Tensor, group_name: str, world_size: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous(), group=_PROCESS_GROUPS[group_name])
    return torch.cat(parts, dim=-1)


@_all_gather.register_fake
def _(x, group_name, world_size):
    return x.new_empty((*x.shape[:-1], x.shape[-1] * world_size))
