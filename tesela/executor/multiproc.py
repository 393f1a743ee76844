"""Tensor-parallel execution over processes: rank 0 in the engine's process, one worker process
per other rank (one GPU each).

The scheduler runs once, in the engine. Every step the driver sends the batch's host lists
(`BatchInputs`, a few KB) to each worker over its pipe, then runs rank 0's forward; each worker
builds the identical ForwardBatch on its own device (same batch id, hence the same stamp, so
each rank plans the same batch) and runs the same forward, so every collective meets its peers
in the same order. Only rank 0's logits are read (the LM head all-gathers them).

A failed worker ends the engine with a clear error in bounded time, never a silent hang:
  - a worker that exits (crash, OOM kill, signal) wakes a watchdog thread that waits on the
    process sentinels; it records which rank died and how, and on NCCL aborts the process
    groups so a collective blocked on the dead peer returns. The next (or current) step raises
    `WorkerFailedError` naming the rank, pid and exit status (and the worker's traceback when
    it could send one);
  - a hung worker makes rank 0's step outlast `distributed_timeout_s`: the process group's
    timeout fails the collective (gloo), or the watchdog sees the step's duration and aborts
    (NCCL inside CUDA graphs escapes the group's timeout); either is a `WorkerFailedError`;
  - start-up waits for every worker's "hello" (spawned, imports done) before joining the
    process group, then for every "ready" under `distributed_timeout_s`, watching the
    sentinels throughout;
  - a worker whose driver is gone reads EOF on its pipe and exits.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing as mp
import multiprocessing.connection
import signal
import threading
import time
import traceback
from dataclasses import dataclass

import torch

from tesela.config import EngineConfig
from tesela.core.forward_batch import BatchInputs
from tesela.distributed.group import (
    abort_distributed,
    destroy_distributed,
    free_port,
    init_distributed,
    rendezvous_env,
)
from tesela.executor.sampling import SampleOutput, SamplingTensors, SamplingVariant, sample

logger = logging.getLogger("tesela.multiproc")

# How long a failed collective waits for the dead worker's exit to become visible, so the
# error can name it rather than only the collective's own message.
EXIT_GRACE_S = 2.0
# Spawning a worker and importing torch there can take a while on a busy host; the collective
# timeout only starts once every worker is ready to join the process group.
SPAWN_TIMEOUT_S = 300.0


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker died or hung: the engine cannot continue and must restart."""


@dataclass
class Worker:
    rank: int
    process: mp.Process
    conn: multiprocessing.connection.Connection

    def describe_exit(self) -> str:
        self.process.join(timeout=1.0)  # a fired sentinel may precede the exit status
        code = self.process.exitcode
        if code is None:
            return "is alive but does not answer"
        if code < 0:
            return f"was killed by signal {signal.Signals(-code).name}"
        return f"exited with code {code}"

    def sent_error(self) -> str | None:
        """The traceback the worker sent before exiting, if any."""
        with contextlib.suppress(EOFError, OSError):
            if self.conn.poll():
                message = self.conn.recv()
                if isinstance(message, tuple) and message[0] == "error":
                    return message[1]
        return None


def worker_main(
    config: EngineConfig,
    model_path: str | None,
    rank: int,
    port: int,
    conn: multiprocessing.connection.Connection,
) -> None:
    """A worker process: build this rank's ModelRunner, then run every batch the driver sends
    until it sends None (shutdown) or goes away (EOF)."""
    from tesela.executor.model_runner import ModelRunner

    size = config.parallel.tensor_parallel_size
    if torch.device(config.device).type == "cpu":
        torch.set_num_threads(1)  # the ranks share the host's cores
    clean = False
    try:
        conn.send(("hello", None))  # imports done: join the process group now
        tp = init_distributed(
            device=config.device,
            timeout_s=config.parallel.distributed_timeout_s,
            env=rendezvous_env(rank, size, port),
            custom_all_reduce=config.parallel.custom_all_reduce,
            fused_all_reduce_add_norm=config.parallel.fused_all_reduce_add_norm,
        )
        runner = ModelRunner(config, model_path, tp)
        conn.send(("ready", runner.num_kv_blocks))
        while (inputs := conn.recv()) is not None:
            runner.execute(inputs)
        runner.release_cuda_graphs()  # before NCCL teardown, which blocks while they live
        clean = True
    except EOFError:
        pass  # the driver is gone: nothing left to serve
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise
    finally:
        with contextlib.suppress(Exception):
            destroy_distributed(barrier=clean)


class TensorParallelRunner:
    """Rank 0's ModelRunner plus the worker processes of ranks 1..N-1, driven in lockstep."""

    def __init__(self, config: EngineConfig, model_path: str | None) -> None:
        from tesela.executor.model_runner import ModelRunner

        self.config = config
        self.size = config.parallel.tensor_parallel_size
        self.timeout_s = config.parallel.distributed_timeout_s
        self.on_cuda = torch.device(config.device).type == "cuda"
        self._failure: str | None = None
        self._closed = False
        self._step_started: float | None = None
        port = free_port()
        self.workers = [self._start_worker(rank, port, model_path) for rank in range(1, self.size)]
        self._watchdog = threading.Thread(target=self._watch, name="tesela-tp-watchdog")
        self._watchdog.daemon = True
        self._watchdog.start()
        atexit.register(self.shutdown)
        try:
            self._wait_for("hello", SPAWN_TIMEOUT_S, "start")
            tp = init_distributed(
                device=config.device,
                timeout_s=self.timeout_s,
                env=rendezvous_env(0, self.size, port),
                custom_all_reduce=config.parallel.custom_all_reduce,
                fused_all_reduce_add_norm=config.parallel.fused_all_reduce_add_norm,
            )
            self.runner = ModelRunner(config, model_path, tp)
            kv_blocks = self._wait_for("ready", self.timeout_s, "finish start-up")
            assert set(kv_blocks) == {self.runner.num_kv_blocks}, "ranks sized different pools"
        except Exception as exc:
            error = self._as_worker_error(exc)
            self.shutdown()
            raise error from exc

    def _start_worker(self, rank: int, port: int, model_path: str | None) -> Worker:
        context = mp.get_context("spawn")  # CUDA cannot be forked
        parent, child = context.Pipe()
        process = context.Process(
            target=worker_main,
            args=(self.config, model_path, rank, port, child),
            name=f"tesela-tp-rank{rank}",
            daemon=True,
        )
        process.start()
        child.close()
        return Worker(rank, process, parent)

    def _wait_for(self, kind: str, timeout_s: float, doing: str) -> list:
        """Every worker's `kind` message payload, watching for deaths, within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        payloads = []
        for worker in self.workers:
            while not worker.conn.poll(0.1):
                self._check()
                if time.monotonic() > deadline:
                    raise WorkerFailedError(
                        f"tensor-parallel worker rank {worker.rank} did not {doing} within "
                        f"{timeout_s:.0f} s"
                    )
            message = worker.conn.recv()
            if message[0] != kind:
                raise WorkerFailedError(f"worker rank {worker.rank} failed:\n{message[1]}")
            payloads.append(message[1])
        return payloads

    # ---- failure detection -----------------------------------------------------------------

    def _watch(self) -> None:
        """Until shutdown: a worker exit, or a step running past the timeout, is a failure."""
        sentinels = {w.process.sentinel: w for w in self.workers}
        while not self._closed:
            ready = multiprocessing.connection.wait(list(sentinels), timeout=0.5)
            if self._closed:
                return
            started = self._step_started
            if ready:
                failure = self._describe(sentinels[ready[0]])
            elif started is not None and time.monotonic() - started > self.timeout_s:
                # NCCL collectives replayed inside CUDA graphs escape the process group's own
                # timeout, so a hung peer is caught here, by the step's duration.
                failure = (
                    f"a tensor-parallel step ran longer than distributed_timeout_s="
                    f"{self.timeout_s:.0f} s: a worker is hung; the engine cannot continue: "
                    "restart it"
                )
            else:
                continue
            self._failure = failure
            logger.error("%s", failure)
            # Rank 0's NCCL and fused all-reduce kernels may spin forever waiting for the
            # peer: aborting lets them return, and the engine raises on its next check (on
            # CPU, gloo times out by itself; only the fused kernel needs telling).
            abort_distributed(nccl=self.on_cuda)
            return

    def _describe(self, worker: Worker) -> str:
        message = (
            f"tensor-parallel worker rank {worker.rank} (pid {worker.process.pid}) "
            f"{worker.describe_exit()}; the engine cannot continue, since every rank must run "
            "every batch: restart it"
        )
        sent = worker.sent_error()
        return f"{message}\nworker traceback:\n{sent}" if sent else message

    def _check(self) -> None:
        if self._failure is not None:
            raise WorkerFailedError(self._failure)

    def _as_worker_error(self, exc: BaseException) -> WorkerFailedError:
        """A failed collective, told in terms of the worker that caused it."""
        if isinstance(exc, WorkerFailedError):
            return exc
        deadline = time.monotonic() + EXIT_GRACE_S
        while self._failure is None and time.monotonic() < deadline:
            dead = [w for w in self.workers if not w.process.is_alive()]
            if dead:  # name it here: the watchdog may not have woken yet
                self._failure = self._describe(dead[0])
                break
            time.sleep(0.05)
        if self._failure is not None:
            return WorkerFailedError(self._failure)
        return WorkerFailedError(
            f"a collective of tensor-parallel rank 0 failed: {exc}. A worker is hung or "
            f"unreachable (collectives wait at most distributed_timeout_s={self.timeout_s:.0f} "
            "s); the engine cannot continue: restart it"
        )

    # ---- running ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def num_kv_blocks(self) -> int:
        return self.runner.num_kv_blocks

    @property
    def dispatcher(self):
        """Rank 0's dispatcher: its counters stand for every rank (they run the same batches)."""
        return self.runner.dispatcher

    @property
    def tp(self):
        """Rank 0's place in the group (every rank made the same all-reduce choices)."""
        return self.runner.tp

    @property
    def lora_manager(self) -> None:
        """No adapters at TP > 1 (make_engine_config refuses LoRA there): the engine and the
        server see a runner without LoRA, as they would at TP = 1 with LoRA off."""
        return None

    def execute(self, inputs: BatchInputs, feed=None) -> torch.Tensor:
        """Send the batch to every worker, run rank 0's share, return rank 0's logits."""
        # Input ids only the device knows (overlap scheduling) cannot reach the workers: the
        # engine turns overlap off at TP>1 (make_engine_config), so every id is on the host.
        assert feed is None, "overlap scheduling is off under tensor parallelism"
        self._check()
        self._step_started = time.monotonic()
        try:
            for worker in self.workers:
                worker.conn.send(inputs)
            logits = self.runner.execute(inputs)
            if self.on_cuda:
                # Wait here, where the watchdog times the step (the sampler would wait anyway).
                torch.cuda.current_stream().synchronize()
        except (RuntimeError, OSError) as exc:
            raise self._as_worker_error(exc) from exc
        finally:
            self._step_started = None
        self._check()
        return logits

    def execute_sample(
        self,
        inputs: BatchInputs,
        tensors: SamplingTensors | None,
        variant: SamplingVariant,
        feed=None,
    ) -> SampleOutput:
        """The step's tokens, sampled on rank 0's device from its gathered logits with the same
        `sample` the FULL decode graphs capture at TP=1 (the workers run the same forward and
        LM head, so their collectives pair up; the sampling itself has none)."""
        return sample(self.execute(inputs, feed), tensors, variant)

    def shutdown(self) -> None:
        """Stop the workers (idempotent): a clean goodbye when all are healthy, else kill."""
        if self._closed:
            return
        self._closed = True
        healthy = self._failure is None and all(w.process.is_alive() for w in self.workers)
        for worker in self.workers:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
        with contextlib.suppress(Exception):
            if getattr(self, "runner", None) is not None:  # None when start-up failed early
                self.runner.release_cuda_graphs()
            destroy_distributed(barrier=healthy)
        for worker in self.workers:
            worker.process.join(timeout=5.0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5.0)
            worker.conn.close()
