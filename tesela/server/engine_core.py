"""The engine core: the LLMEngine's busy loop, in a process of its own under `tesela serve`.

Why a process: on a thread of the server, the engine loop shares one GIL with uvicorn, JSON and
SSE work for every open stream, so the host stalls between steps and the GPU idles. Here the
loop owns its interpreter (vLLM's EngineCore does the same). It talks to the frontend
(core_client.py) over two one-way `multiprocessing` pipes of small tuples:

    frontend -> core   (ADD, group_id, request_ids, prompts, params, cache_salt, lora_request)
                       (ABORT, request_ids)
                       (CALL, call_id, method, args)   method in CALLABLE; stats too
                       (STOP,)
    core -> frontend   (READY, EngineFacts) once, or (FATAL, kind, message)
                       (ADDED, group_id, error)        error: None or (kind, message)
                       (RESULT, call_id, error, value)
                       (STEP, outputs)                ONE message per step, deltas only
                       (FAILED, request_ids, message)  a step raised; those requests are gone

A STEP output is (request_id, new_token_ids, text_keep, text_tail, new_logprobs, finished,
finish_reason, num_cached_tokens, prompt_logprobs): the frontend's text becomes
`text[:text_keep] + text_tail` (the engine may rewrite settled text, e.g. a stop string cut at
the end), `new_logprobs` extend its list, and prompt logprobs travel with the first and
last outputs only. Nothing grows with
the output length, so a step's message costs the same at token 1 and token 1,000.

The loop drains commands without blocking while there is work, blocks on the pipe when there
is none, and exits when the frontend closes its end (the frontend died) or sends STOP. It
ignores SIGINT and SIGTERM: the frontend owns its life (and kills it if STOP is not obeyed).
"""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from tesela.engine.llm_engine import LLMEngine, RequestOutput, make_engine_config
from tesela.engine.text import TextSnapshot
from tesela.engine_args import EngineArgs
from tesela.lora.request import LoRARequest

logger = logging.getLogger("tesela.server")

READY, FATAL, ADDED, RESULT, STEP, FAILED = "ready", "fatal", "added", "result", "step", "failed"
ADD, ABORT, CALL, STOP = "add", "abort", "call", "stop"
# Engine methods the frontend may call by name ("stats" is LLMEngine.stats).
CALLABLE = frozenset({"add_lora", "remove_lora", "list_loras", "stats"})
# Exceptions that cross the pipe as themselves (user errors: a 4xx, or the CLI's message as
# in-process); any other kind arrives as an EngineError with its text.
KNOWN_ERRORS = {
    error.__name__: error
    for error in (ValueError, TypeError, FileNotFoundError, OSError, ImportError)
}


@dataclass(frozen=True)
class EngineFacts:
    """What the frontend needs to know about the engine it serves (read once, at startup)."""

    model: str
    max_model_len: int
    max_num_seqs: int
    vocab_size: int
    sampling_defaults: dict
    loras: tuple[LoRARequest, ...]
    tokenizer_path: str | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def of(cls, engine: LLMEngine, model_path: str | None) -> EngineFacts:
        config = engine.config
        return cls(
            model=config.model,
            max_model_len=config.scheduler.max_model_len,  # as lowered to fit the KV pool
            max_num_seqs=config.scheduler.max_num_seqs,
            vocab_size=config.model_config.vocab_size,
            sampling_defaults=dict(config.sampling_defaults),
            loras=tuple(engine.list_loras()),
            tokenizer_path=config.tokenizer or model_path,
            eos_token_ids=tuple(config.model_config.eos_token_ids),
        )


def error_payload(exc: BaseException) -> tuple[str, str]:
    kind = type(exc).__name__
    return (kind if kind in KNOWN_ERRORS else "EngineError", str(exc))


class EngineCore:
    """The busy loop around one LLMEngine; `run()` returns when asked to stop."""

    def __init__(self, engine: LLMEngine, commands: Connection, outputs: Connection) -> None:
        self.engine = engine
        self.commands = commands
        self.outputs = outputs
        self.live: set[str] = set()
        # Per live request: (text the frontend has, logprobs it has, prompt logprobs sent).
        self.sent: dict[str, tuple[TextSnapshot | None, int, bool]] = {}

    def run(self) -> None:
        try:
            while self._drain(block=not self.engine.has_unfinished()):
                if self.engine.has_unfinished():
                    self._step()
        except (EOFError, OSError):  # the frontend is gone: nobody is left to serve
            logger.warning("the engine core lost its frontend; stopping")

    # ---- commands -----------------------------------------------------------------------

    def _drain(self, block: bool) -> bool:
        """Apply every queued command (waiting for one when idle); False once told to stop."""
        if not block and not self.commands.poll():
            return True
        while True:
            command = self.commands.recv()
            if command[0] == STOP:
                return False
            self._apply(command)
            if not self.commands.poll():
                return True

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == ADD:
            self._add(*command[1:])
        elif kind == ABORT:
            for request_id in command[1]:
                if request_id in self.live:
                    self._forget(request_id)
                    self.engine.abort(request_id)
        elif kind == CALL:
            self._call(*command[1:])
        else:
            raise AssertionError(f"unknown engine-core command {kind!r}")

    def _add(self, group_id, request_ids, prompts, params, cache_salt, lora_request) -> None:
        added: list[str] = []
        try:
            for request_id, prompt, sampling in zip(request_ids, prompts, params, strict=True):
                self.engine.add_request(
                    prompt, sampling, request_id, cache_salt=cache_salt, lora_request=lora_request
                )
                added.append(request_id)
        except Exception as exc:  # all or none: undo the choices already queued
            for request_id in added:
                self.engine.abort(request_id)
            self.outputs.send((ADDED, group_id, error_payload(exc)))
            return
        for request_id in added:
            self.live.add(request_id)
            self.sent[request_id] = (None, 0, False)
        self.outputs.send((ADDED, group_id, None))

    def _call(self, call_id: int, method: str, args: tuple) -> None:
        assert method in CALLABLE, method
        try:
            value = getattr(self.engine, method)(*args)
        except Exception as exc:
            self.outputs.send((RESULT, call_id, error_payload(exc), None))
            return
        self.outputs.send((RESULT, call_id, None, value))

    def _forget(self, request_id: str) -> None:
        self.live.discard(request_id)
        self.sent.pop(request_id, None)

    # ---- steps --------------------------------------------------------------------------

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            failed = sorted(self.live)
            logger.exception("an engine step failed; failing requests %s", ", ".join(failed))
            for request_id in failed:
                self._forget(request_id)
                try:
                    self.engine.abort(request_id)
                except Exception:  # the engine is already broken; still answer the client
                    logger.exception("abort of %s failed", request_id)
            message = (
                "the engine failed while running this request: the server logged it under "
                "this request's id"
            )
            self.outputs.send((FAILED, failed, message))
            return
        deltas = [self._delta(output) for output in outputs if output.request_id in self.live]
        if deltas:
            self.outputs.send((STEP, deltas))

    def _delta(self, output: RequestOutput) -> tuple:
        request_id = output.request_id
        text_sent, logprobs_sent, prompt_sent = self.sent[request_id]
        # What the text adds since the last delta, without joining it: O(new characters), or
        # from where it differs once a stop string cut text already sent.
        text = output.text_snapshot
        keep = text.common_prefix(text_sent)
        new_logprobs = None
        if output.logprobs is not None:
            new_logprobs = output.logprobs[logprobs_sent:]
            logprobs_sent = len(output.logprobs)
        prompt_logprobs = None
        # Complete from the first output on (outputs follow the whole prompt); sent again at
        # the end so that the final state never depends on that.
        if output.prompt_logprobs is not None and (not prompt_sent or output.finished):
            prompt_logprobs, prompt_sent = output.prompt_logprobs, True
        if output.finished:
            self._forget(request_id)
        else:
            self.sent[request_id] = (text, logprobs_sent, prompt_sent)
        return (
            request_id,
            output.new_token_ids,
            keep,
            text.slice(keep),
            new_logprobs,
            output.finished,
            output.finish_reason,
            output.num_cached_tokens,
            prompt_logprobs,
        )


def run_engine_core(
    engine_args: EngineArgs,
    loras: list[LoRARequest],
    commands: Connection,
    outputs: Connection,
    log_level: int = logging.INFO,
    torch_threads: int | None = None,
) -> None:
    """The engine process's entry point: build the engine, say READY, serve until STOP.
    `torch_threads` sets the process's intra-op CPU threads (None: torch's default)."""
    logging.basicConfig(level=log_level, stream=sys.stderr, format="%(levelname)s %(message)s")
    # Ctrl-C (or a SIGTERM to the process group) reaches this process too: the frontend
    # drains first and then stops it (STOP), and its exit closes the pipe, which ends it too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    engine = None
    try:
        config, model_path = make_engine_config(engine_args)
        engine = LLMEngine(config, model_path)
        for lora in loras:
            engine.add_lora(lora)
        facts = EngineFacts.of(engine, model_path)
    except Exception as exc:
        if error_payload(exc)[0] not in KNOWN_ERRORS:  # a user error's message says it all
            logger.exception("the engine failed to start")
        outputs.send((FATAL, *error_payload(exc)))
        if engine is not None:  # built, then failed: stop its tensor-parallel workers too
            engine.shutdown()
        raise SystemExit(1) from None
    outputs.send((READY, facts))
    try:
        EngineCore(engine, commands, outputs).run()
    finally:
        engine.shutdown()
