"""AsyncEngine: one background thread owns the LLMEngine; asyncio handlers talk to it.

This is the in-process mode (`tesela serve --engine-in-process`); by default the engine runs
in a process of its own (engine_core.py, core_client.py: the same interface). RequestGroup and
the exceptions here are shared by both.

The engine is not thread-safe, so exactly one thread touches it. Handlers submit work through a
thread-safe command queue (add, abort, call, stop); the thread drains the queue between steps, runs
`step()` while there is work and sleeps on the queue when there is none. Each step's outputs go
back to the event loop in one `call_soon_threadsafe` call, into per-request asyncio queues.

Admission is bounded: at most `max_num_seqs + max_queue_len` engine requests may be in flight,
beyond that `submit` raises `Overloaded` (HTTP 503) at once instead of growing the queue without
limit. An accepted request is never dropped: the scheduler preempts and resumes under KV
pressure. If a step raises, the requests in flight get the error, their KV blocks are freed and
the loop keeps serving; the exception is logged once, and clients see no internal text.

Shutdown drains: `begin_drain` refuses new requests (503) while running ones continue;
`cut_off` then ends whatever is left with `ShuttingDown`, which streams report in-band.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from tesela.engine.llm_engine import LLMEngine, RequestOutput
from tesela.engine.sampling_params import SamplingParams
from tesela.lora.request import LoRARequest

logger = logging.getLogger("tesela.server")


class Overloaded(Exception):
    """Too many requests in flight: the client should retry later (HTTP 503)."""


class EngineError(Exception):
    """The engine failed while running a request, or is not running (HTTP 500/503)."""


class ShuttingDown(EngineError):
    """The server is stopping: the request was cut off or refused (HTTP 503)."""


@dataclass
class RequestGroup:
    """One HTTP request: `n` choices per prompt, each one engine request, one output queue.

    Outputs arrive as (choice index, RequestOutput) or (choice index, exception); `outputs()`
    coalesces whatever is queued so a slow reader gets the latest state, not a backlog."""

    group_id: str
    request_ids: list[str]
    arrival: float
    abort_callback: Callable[[RequestGroup], None]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    unfinished: set[int] = field(default_factory=set)
    first_token_at: dict[int, float] = field(default_factory=dict)
    last_token_at: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.unfinished = set(range(len(self.request_ids)))

    @property
    def finished(self) -> bool:
        return not self.unfinished

    async def outputs(self) -> AsyncIterator[dict[int, RequestOutput]]:
        """Yield {choice index: latest output} until every choice finished; raise on error."""
        while self.unfinished:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            latest: dict[int, RequestOutput] = {}
            for index, item in items:
                if isinstance(item, BaseException):
                    self.unfinished.clear()
                    raise item
                latest[index] = item
                if item.finished:
                    self.unfinished.discard(index)
            yield latest

    def abort(self) -> None:
        """Stop every unfinished choice and free its KV blocks (safe to call twice)."""
        if self.unfinished:
            self.unfinished.clear()
            self.abort_callback(self)


@dataclass
class _Add:
    group: RequestGroup
    prompts: list[list[int]]
    params: list[SamplingParams]
    future: asyncio.Future
    cache_salt: str | None = None
    lora_request: LoRARequest | None = None


@dataclass
class _Abort:
    group: RequestGroup


@dataclass
class _Call:
    """Run `fn(engine)` on the engine thread between steps (adapter load/unload)."""

    fn: Callable[[LLMEngine], Any]
    future: asyncio.Future


class _Stop:
    pass


@dataclass
class _FailAll:
    error: Exception


class AsyncEngine:
    """Runs `engine` on its own thread; `submit` from the event loop returns a RequestGroup."""

    def __init__(self, engine: LLMEngine, *, max_queue_len: int = 1024, metrics=None) -> None:
        self.engine = engine
        self.max_in_flight = engine.config.scheduler.max_num_seqs + max_queue_len
        self.metrics = metrics
        self._commands: queue.Queue = queue.Queue()
        self._live: dict[str, tuple[RequestGroup, int]] = {}  # engine thread only
        self._lock = threading.Lock()  # guards _num_pending, _closed and _stats
        self._num_pending = 0
        self._closed = False
        self._stats: dict = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dead_reason: str | None = None
        self.draining = False

    # ---- lifecycle (event loop side) -------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will read the outputs."""
        self._loop = asyncio.get_running_loop()
        self._refresh_stats()
        self._thread = threading.Thread(target=self._run, name="tesela-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(_Stop())
            self._thread.join(timeout)

    def begin_drain(self) -> None:
        """Refuse new requests from now on; running ones continue."""
        with self._lock:
            self.draining = True

    def cut_off(self, message: str) -> int:
        """End every request in flight with ShuttingDown; returns how many were pending."""
        with self._lock:
            pending = self._num_pending
        self._commands.put(_FailAll(ShuttingDown(message)))
        return pending

    @property
    def num_pending(self) -> int:
        with self._lock:
            return self._num_pending

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_reason is None

    # ---- requests (event loop side) ---------------------------------------------------------

    async def submit(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        group_id: str | None = None,
        *,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> RequestGroup:
        """Queue one engine request per (prompt, params) pair, all or none.

        Raises Overloaded when admission is full, ValueError when the engine refuses the input,
        EngineError when the engine is not running."""
        group_id = group_id or f"grp-{next(self._ids)}"
        group = RequestGroup(
            group_id=group_id,
            request_ids=[f"{group_id}-{i}" for i in range(len(prompts))],
            arrival=time.monotonic(),
            abort_callback=lambda g: self._commands.put(_Abort(g)),
        )
        future = self._loop.create_future()
        self._admit(_Add(group, prompts, params, future, cache_salt, lora_request))
        try:
            await future
        except asyncio.CancelledError:
            group.abort()  # the client left before the engine took the request
            raise
        return group

    def _admit(self, command: _Add) -> None:
        count = len(command.prompts)
        if count > self.max_in_flight:  # could never be admitted: the client's error, not load
            raise ValueError(
                f"this request needs {count} sequences (prompts x n), more than the server "
                f"admits at once ({self.max_in_flight}): lower n or send fewer prompts"
            )
        # Under the lock, so that no command slips in after the engine thread's final drain.
        with self._lock:
            if self.draining:
                raise ShuttingDown("the server is shutting down: retry on another replica")
            if self._closed or not self.is_running:
                reason = self.dead_reason or ("shutting down" if self._closed else "not started")
                raise EngineError(f"the engine is not running: {reason}")
            if self._num_pending + count > self.max_in_flight:
                raise Overloaded(
                    f"the server is at capacity ({self._num_pending} requests in flight, limit "
                    f"{self.max_in_flight} = max_num_seqs + max_queue_len): retry later, or "
                    "start the server with a larger --max-queue-len"
                )
            self._num_pending += count
            self._commands.put(command)

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run `fn(engine)` on the engine thread (which owns the engine) and return its result;
        its exception is raised here."""
        future = self._loop.create_future()
        with self._lock:
            if self._closed or not self.is_running:
                raise EngineError(f"the engine is not running: {self.dead_reason or 'stopped'}")
            self._commands.put(_Call(fn, future))
        return await future

    async def add_lora(self, lora: LoRARequest) -> int:
        return await self.call(lambda engine: engine.add_lora(lora))

    async def remove_lora(self, lora_id: int) -> None:
        await self.call(lambda engine: engine.remove_lora(lora_id))

    async def fetch_stats(self) -> dict:
        return self.stats()

    def _release(self, count: int) -> None:
        with self._lock:
            self._num_pending -= count

    def stats(self) -> dict:
        """The engine's stats as of its last loop iteration, plus admission numbers."""
        with self._lock:
            return dict(
                self._stats, num_pending=self._num_pending, max_in_flight=self.max_in_flight
            )

    # ---- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        error = EngineError("the server is shutting down")
        try:
            while self._handle_commands(block=not self.engine.has_unfinished()):
                if self.engine.has_unfinished():
                    self._step()
                self._refresh_stats()
        except BaseException:  # a bug in this loop: fail loudly, never hang clients
            logger.exception("the engine loop died")
            self.dead_reason = "the engine loop died (see the server log)"
            error = EngineError(self.dead_reason)
        with self._lock:
            self._closed = True
        self._fail_all(error)
        self._refuse_queued(error)

    def _refuse_queued(self, error: EngineError) -> None:
        """Answer the adds that were queued behind the stop, so no client waits forever."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                self._release(len(command.prompts))
            if isinstance(command, (_Add, _Call)):
                self._post(_resolve, command.future, error)

    def _handle_commands(self, block: bool) -> bool:
        """Apply queued commands; False once asked to stop."""
        try:
            commands = [self._commands.get(block=block)]
        except queue.Empty:
            return True
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                break
        for command in commands:
            if isinstance(command, _Stop):
                return False
            if isinstance(command, _Add):
                self._add(command)
            elif isinstance(command, _Call):
                self._call(command)
            elif isinstance(command, _FailAll):
                self._fail_all(command.error)
            else:
                self._abort(command.group)
        return True

    def _add(self, command: _Add) -> None:
        group = command.group
        added: list[str] = []
        try:
            for index, (prompt, params) in enumerate(
                zip(command.prompts, command.params, strict=True)
            ):
                request_id = group.request_ids[index]
                self.engine.add_request(
                    prompt,
                    params,
                    request_id,
                    cache_salt=command.cache_salt,
                    lora_request=command.lora_request,
                )
                self._live[request_id] = (group, index)
                added.append(request_id)
        except Exception as exc:  # all or none: undo the choices already queued
            for request_id in added:
                self.engine.abort(request_id)
                self._live.pop(request_id, None)
            self._release(len(command.prompts))
            self._post(_resolve, command.future, exc)
            return
        self._post(_resolve, command.future, None)

    def _call(self, command: _Call) -> None:
        try:
            result = command.fn(self.engine)
        except Exception as exc:
            self._post(_resolve, command.future, exc)
            return
        self._post(_set_result, command.future, result)

    def _abort(self, group: RequestGroup) -> None:
        for request_id in group.request_ids:
            if self._live.pop(request_id, None) is not None:
                self.engine.abort(request_id)
                self._release(1)
                if self.metrics is not None:
                    self.metrics.requests_finished.inc(1, "abort")

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            groups = sorted({group.group_id for group, _ in self._live.values()})
            logger.exception("an engine step failed; failing requests %s", ", ".join(groups))
            if self.metrics is not None:
                self.metrics.engine_errors.inc()
            self._fail_all(
                EngineError(
                    "the engine failed while running this request: the server logged it under "
                    "this request's id"
                )
            )
            return
        delivered = []
        for output in outputs:
            entry = self._live.get(output.request_id)
            if entry is None:
                continue
            delivered.append((entry[0], entry[1], output))
            if output.finished:
                del self._live[output.request_id]
                self._release(1)
        if delivered:
            self._post(self._deliver, delivered)

    def _fail_all(self, error: Exception) -> None:
        """Give every request in flight `error` and free its blocks."""
        failed = []
        for request_id, (group, index) in list(self._live.items()):
            try:
                self.engine.abort(request_id)
            except Exception:  # the engine is already broken; still answer the client
                logger.exception("abort of %s failed", request_id)
            failed.append((group, index, error))
        self._release(len(self._live))
        self._live.clear()
        if failed:
            self._post(self._deliver, failed)

    def _refresh_stats(self) -> None:
        stats = self.engine.stats()
        with self._lock:
            self._stats = stats

    def _post(self, callback, *args) -> None:
        # RuntimeError: the event loop is closed, so nobody is left to answer.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    # ---- back on the event loop -----------------------------------------------------------

    def _deliver(self, items: list[tuple[RequestGroup, int, RequestOutput | Exception]]) -> None:
        now = time.monotonic()
        for group, index, item in items:
            if isinstance(item, RequestOutput) and self.metrics is not None:
                record_output(self.metrics, group, index, item, now)
            group.queue.put_nowait((index, item))


def record_output(metrics, group: RequestGroup, index: int, output: RequestOutput, now: float):
    """Count one output of choice `index` in the server's metrics (on the event loop)."""
    new = len(output.new_token_ids)
    if new:
        metrics.generation_tokens.inc(new)
        if index not in group.first_token_at:
            group.first_token_at[index] = now
            metrics.time_to_first_token.observe(now - group.arrival)
        else:
            gap = now - group.last_token_at[index]
            metrics.time_per_output_token.observe(gap / new, times=new)
        group.last_token_at[index] = now
    if output.finished:
        metrics.requests_finished.inc(1, output.finish_reason or "unknown")
        metrics.e2e_latency.observe(now - group.arrival)


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _resolve(future: asyncio.Future, error: Exception | None) -> None:
    if future.done():  # cancelled: the client already left
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
