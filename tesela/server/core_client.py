"""EngineCoreClient: the server's side of the engine-core process (engine_core.py).

The same interface as AsyncEngine (the in-process mode), so the routes cannot tell them apart:
bounded admission (`Overloaded`), RequestGroups fed per step, aborts that free KV blocks,
drain then cut-off, LoRA calls and stats. Everything here runs on the event loop but
`shutdown` (called off the loop: it sends STOP and joins): the loop watches the output pipe
itself (`add_reader`) and handles each step's message when it arrives. A reader thread, as
before, made every message wait for the GIL that the busy loop holds (up to the interpreter's
5 ms switch interval) before the loop even heard of it.

Each request keeps one cumulative RequestOutput that every STEP message extends in place
(tokens appended, text spliced, logprobs appended), so a step costs the frontend O(new
tokens) per request, and `RequestGroup.outputs()` still coalesces to the latest state.

If the engine process dies, the reader sees the pipe close at once: every request in flight
fails with an EngineError naming the exit code, and /health answers 503 from then on.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import multiprocessing
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from tesela.engine.llm_engine import RequestOutput
from tesela.engine.sampling_params import SamplingParams
from tesela.engine_args import EngineArgs
from tesela.lora.request import LoRARequest
from tesela.server import engine_core as core
from tesela.server.async_engine import (
    EngineError,
    Overloaded,
    RequestGroup,
    ShuttingDown,
    record_output,
)
from tesela.server.engine_core import EngineFacts

logger = logging.getLogger("tesela.server")

STATS_TIMEOUT = 10.0  # seconds /stats waits for a busy core before showing the last snapshot


class EngineStartError(RuntimeError):
    """The engine process could not start (its log says why)."""


def _rebuild_error(error: tuple[str, str]) -> Exception:
    kind, message = error
    return core.KNOWN_ERRORS.get(kind, EngineError)(message)


class EngineCoreClient:
    """Drives one engine-core process; build it with `launch`, `start` it on the event loop."""

    def __init__(
        self,
        process,
        commands: Connection,
        outputs: Connection,
        facts: EngineFacts,
        *,
        max_queue_len: int = 1024,
        metrics=None,
    ) -> None:
        self.process = process
        self.facts = facts
        self.max_in_flight = facts.max_num_seqs + max_queue_len
        self.metrics = metrics
        self._commands = commands
        self._outputs = outputs
        self._send_lock = threading.Lock()  # the loop and `shutdown` both send
        self._live: dict[str, tuple[RequestGroup, int, RequestOutput]] = {}
        self._adds: dict[str, tuple[asyncio.Future, RequestGroup]] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._group_ids = itertools.count()
        self._stats: dict = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._stopping = False
        self.dead_reason: str | None = None
        self.draining = False
        atexit.register(self._close_at_exit)

    # ---- starting and stopping ------------------------------------------------------------

    @classmethod
    def launch(
        cls,
        engine_args: EngineArgs,
        loras: list[LoRARequest] = (),
        *,
        max_queue_len: int = 1024,
        log_level: int = logging.INFO,
        torch_threads: int | None = None,
    ) -> EngineCoreClient:
        """Spawn the engine process (never fork: CUDA) and wait until its engine is built.
        `torch_threads`: the engine process's intra-op CPU threads (None: torch's default)."""
        context = multiprocessing.get_context("spawn")
        commands_out, commands_in = context.Pipe(duplex=False)
        outputs_out, outputs_in = context.Pipe(duplex=False)
        # Not a daemon: the engine starts tensor-parallel workers of its own.
        process = context.Process(
            target=core.run_engine_core,
            args=(engine_args, list(loras), commands_out, outputs_in, log_level, torch_threads),
            name="tesela-engine-core",
        )
        process.start()
        # Only the child holds these ends now, so its death closes the pipes for us.
        commands_out.close()
        outputs_in.close()
        facts = cls._wait_ready(process, outputs_out)
        return cls(process, commands_in, outputs_out, facts, max_queue_len=max_queue_len)

    @staticmethod
    def _wait_ready(process, outputs: Connection) -> EngineFacts:
        # No timeout: loading and graph capture can take minutes; a dead child ends the wait.
        try:
            message = outputs.recv()
        except EOFError:
            process.join(5)
            raise EngineStartError(
                f"the engine process exited (code {process.exitcode}) before it was ready: its "
                "log above says why"
            ) from None
        if message[0] == core.FATAL:
            process.join(5)
            error = _rebuild_error(message[1:])
            if isinstance(error, EngineError):  # not the user's error: say where to look
                raise EngineStartError(f"the engine failed to start: {message[2]}")
            raise error
        assert message[0] == core.READY, message
        return message[1]

    def start(self) -> None:
        """Start reading the engine's outputs; call from the event loop that serves them."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._outputs.fileno(), self._read_outputs)
        self._reading = True

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine process (blocking: call it off the event loop)."""
        self._stopping = True
        with contextlib.suppress(OSError, ValueError):
            self._send((core.STOP,))
        self.process.join(timeout)
        if self.process.is_alive():
            logger.warning("the engine process did not stop within %.0f s; killing it", timeout)
            self.process.kill()
            self.process.join(5)
        with contextlib.suppress(OSError):
            self._commands.close()

    def _close_at_exit(self) -> None:
        # multiprocessing joins non-daemon children at exit: make sure this one ends.
        if self.process.is_alive():
            self.shutdown(timeout=5)

    def begin_drain(self) -> None:
        """Refuse new requests from now on; running ones continue."""
        self.draining = True

    def cut_off(self, message: str) -> int:
        """End every request in flight with ShuttingDown; returns how many were pending."""
        pending = len(self._live)
        self._fail(list(self._live), ShuttingDown(message), abort=True)
        return pending

    @property
    def num_pending(self) -> int:
        return len(self._live)

    @property
    def is_running(self) -> bool:
        return self._reading and self.dead_reason is None and not self._stopping

    # ---- requests ---------------------------------------------------------------------------

    async def submit(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        group_id: str | None = None,
        *,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> RequestGroup:
        """Queue one engine request per (prompt, params) pair, all or none (see AsyncEngine)."""
        group_id = group_id or f"grp-{next(self._group_ids)}"
        group = RequestGroup(
            group_id=group_id,
            request_ids=[f"{group_id}-{i}" for i in range(len(prompts))],
            arrival=time.monotonic(),
            abort_callback=self._abort,
        )
        self._admit(group, prompts)
        future = self._loop.create_future()
        self._adds[group_id] = (future, group)
        add = (core.ADD, group_id, group.request_ids, prompts, params, cache_salt, lora_request)
        try:
            self._send(add)
        except (OSError, ValueError):  # the process died; the reader has not said so yet
            self._adds.pop(group_id)
            self._fail(group.request_ids, EngineError("the engine process is gone"), abort=False)
            raise EngineError("the engine is not running: its process is gone") from None
        try:
            await future
        except asyncio.CancelledError:
            group.abort()  # the client left before the engine took the request
            raise
        return group

    def _admit(self, group: RequestGroup, prompts: list[list[int]]) -> None:
        count = len(prompts)
        if count > self.max_in_flight:  # could never be admitted: the client's error, not load
            raise ValueError(
                f"this request needs {count} sequences (prompts x n), more than the server "
                f"admits at once ({self.max_in_flight}): lower n or send fewer prompts"
            )
        if self.draining:
            raise ShuttingDown("the server is shutting down: retry on another replica")
        if not self.is_running:
            reason = self.dead_reason or ("shutting down" if self._stopping else "not started")
            raise EngineError(f"the engine is not running: {reason}")
        if len(self._live) + count > self.max_in_flight:
            raise Overloaded(
                f"the server is at capacity ({len(self._live)} requests in flight, limit "
                f"{self.max_in_flight} = max_num_seqs + max_queue_len): retry later, or "
                "start the server with a larger --max-queue-len"
            )
        # Registered now: the engine's first outputs may follow its ADDED reply closely.
        for index, (request_id, prompt) in enumerate(zip(group.request_ids, prompts, strict=True)):
            output = RequestOutput(request_id, prompt, [], "")
            self._live[request_id] = (group, index, output)

    def _abort(self, group: RequestGroup) -> None:
        ids = [rid for rid in group.request_ids if self._live.pop(rid, None) is not None]
        if not ids:
            return
        if self.metrics is not None:
            self.metrics.requests_finished.inc(len(ids), "abort")
        with contextlib.suppress(OSError, ValueError):  # a dead engine holds no blocks
            self._send((core.ABORT, ids))

    async def add_lora(self, lora: LoRARequest) -> int:
        return await self._call("add_lora", lora)

    async def remove_lora(self, lora_id: int) -> None:
        await self._call("remove_lora", lora_id)

    async def fetch_stats(self) -> dict:
        """The engine's stats as of now (between two steps), plus admission numbers."""
        if self.is_running:
            with contextlib.suppress(asyncio.TimeoutError, EngineError):
                self._stats = await asyncio.wait_for(self._call("stats"), STATS_TIMEOUT)
        return self.stats()

    def stats(self) -> dict:
        """The last stats the engine sent, plus admission numbers."""
        return dict(self._stats, num_pending=len(self._live), max_in_flight=self.max_in_flight)

    async def _call(self, method: str, *args) -> Any:
        if not self.is_running:
            raise EngineError(f"the engine is not running: {self.dead_reason or 'stopped'}")
        call_id = next(self._call_ids)
        future = self._loop.create_future()
        self._calls[call_id] = future
        self._send((core.CALL, call_id, method, args))
        try:
            return await future
        finally:
            self._calls.pop(call_id, None)

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._commands.send(message)

    # ---- the output pipe, read on the event loop ------------------------------------------

    def _read_outputs(self) -> None:
        """Every message that has arrived (the engine writes each one whole)."""
        try:
            while self._outputs.poll():
                self._on_message(self._outputs.recv())
        except (EOFError, OSError):  # the engine process ended (or died)
            self._loop.remove_reader(self._outputs.fileno())
            # Joining may take a moment: off the loop, then back on it.
            waiter = self._loop.run_in_executor(None, self.process.join, 5)
            waiter.add_done_callback(lambda _: self._on_exit(self.process.exitcode))

    # ---- back on the event loop -------------------------------------------------------------

    def _on_message(self, message: tuple) -> None:
        kind = message[0]
        if kind == core.STEP:
            self._deliver(message[1])
        elif kind == core.ADDED:
            self._on_added(message[1], message[2])
        elif kind == core.RESULT:
            _, call_id, error, value = message
            future = self._calls.get(call_id)
            if future is not None and not future.done():
                if error is None:
                    future.set_result(value)
                else:
                    future.set_exception(_rebuild_error(error))
        elif kind == core.FAILED:
            if self.metrics is not None:
                self.metrics.engine_errors.inc()
            self._fail(message[1], EngineError(message[2]), abort=False)

    def _on_added(self, group_id: str, error) -> None:
        future, group = self._adds.pop(group_id)
        if error is not None:
            for request_id in group.request_ids:
                self._live.pop(request_id, None)
            group.unfinished.clear()
        if not future.done():  # cancelled: the client already left
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(_rebuild_error(error))

    def _deliver(self, deltas: list[tuple]) -> None:
        now = time.monotonic()
        for delta in deltas:
            (request_id, new_ids, keep, tail, logprobs, finished, reason, cached, prompt_lps) = (
                delta
            )
            entry = self._live.get(request_id)
            if entry is None:  # aborted meanwhile
                continue
            group, index, output = entry
            output.token_ids.extend(new_ids)
            output.new_token_ids = new_ids
            # The text grows in place (O(new characters)); a cut at a stop string (keep short
            # of the text) starts a new buffer, so snapshots already queued keep their text.
            text = output.text_snapshot
            buffer = text.buffer if keep == len(text) else text.buffer.cut(keep)
            buffer.append(tail)
            output.text = buffer.snapshot()
            if logprobs is not None:
                if output.logprobs is None:
                    output.logprobs = []
                output.logprobs.extend(logprobs)
            if prompt_lps is not None:
                output.prompt_logprobs = prompt_lps
            output.finished, output.finish_reason = finished, reason
            output.num_cached_tokens = cached
            if finished:
                del self._live[request_id]
            if self.metrics is not None:
                record_output(self.metrics, group, index, output, now)
            group.queue.put_nowait((index, output))

    def _fail(self, request_ids, error: Exception, *, abort: bool) -> None:
        """Give each of `request_ids` still in flight `error`; tell the engine to drop them."""
        failed = [rid for rid in request_ids if rid in self._live]
        for request_id in failed:
            group, index, _ = self._live.pop(request_id)
            group.queue.put_nowait((index, error))
        if abort and failed and self.is_running:
            with contextlib.suppress(OSError, ValueError):
                self._send((core.ABORT, failed))

    def _on_exit(self, exitcode: int | None) -> None:
        if self._stopping:
            error = EngineError("the server is shutting down")
        else:
            self.dead_reason = (
                f"the engine process exited unexpectedly (exit code {exitcode}); requests in "
                "flight were lost: see the server log, and restart the server"
            )
            logger.error("%s", self.dead_reason)
            error = EngineError(self.dead_reason)
        self._fail(list(self._live), error, abort=False)
        for future, _ in self._adds.values():
            if not future.done():
                future.set_exception(error)
        self._adds.clear()
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
