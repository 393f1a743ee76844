"""Entry points of the OpenAI-compatible server: `create_app`, `tesela serve`, ServerThread.

This module imports no web framework at import time, so the CLI can always offer `serve`
and say how to install what is missing; the HTTP layer itself is in routes.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tesela.engine_args import EngineArgs
from tesela.lora.request import LoRARequest
from tesela.tokenizer import load_chat_template

if TYPE_CHECKING:  # the engine (and torch) load only when a server is built
    from tesela.engine.llm_engine import LLMEngine

DEFAULT_MAX_QUEUE_LEN = 1024
DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20
DEFAULT_DRAIN_TIMEOUT = 30.0


def require_server_dependencies() -> None:
    missing = []
    for module in ("starlette", "uvicorn", "anyio"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(
            f"the server needs {', '.join(missing)}: pip install 'tesela[server]' "
            "(or pip install starlette uvicorn)"
        )


def create_app(
    engine: LLMEngine,
    *,
    served_model_name: str | None = None,
    max_queue_len: int = DEFAULT_MAX_QUEUE_LEN,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_seqs_per_request: int | None = None,
    api_key: str | None = None,
    chat_template: str | None = None,
):
    """A Starlette app serving `engine` in this process (`--engine-in-process`): its engine
    thread starts with the app's lifespan and shares this interpreter's GIL with the HTTP work.

    `max_queue_len` bounds how many requests may wait beyond `max_num_seqs` running ones;
    past that the server answers 503 instead of queueing without limit. One request may ask
    for at most `max_seqs_per_request` sequences (default: max_num_seqs)."""
    require_server_dependencies()
    from tesela.server.async_engine import AsyncEngine
    from tesela.server.engine_core import EngineFacts

    _check_queue_len(max_queue_len)
    facts = EngineFacts.of(engine, None)  # the engine's own tokenizer serves, no path needed
    frontend = AsyncEngine(engine, max_queue_len=max_queue_len)
    return _build(
        frontend,
        facts,
        engine.tokenizer,
        served_model_name=served_model_name,
        max_request_bytes=max_request_bytes,
        max_seqs_per_request=max_seqs_per_request,
        api_key=api_key,
        chat_template=chat_template,
    )


def create_process_app(
    engine_args: EngineArgs,
    loras: list[LoRARequest] = (),
    *,
    served_model_name: str | None = None,
    max_queue_len: int = DEFAULT_MAX_QUEUE_LEN,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_seqs_per_request: int | None = None,
    api_key: str | None = None,
    chat_template: str | None = None,
    log_level: int = logging.INFO,
    torch_threads: int | None = None,
):
    """A Starlette app whose engine runs in an engine-core process of its own (the default of
    `tesela serve`): the engine loop never waits for the GIL on HTTP, JSON or SSE work. Returns
    once the engine is built; the process stops with the app's lifespan (or at exit)."""
    require_server_dependencies()
    from tesela.server.core_client import EngineCoreClient
    from tesela.tokenizer import load_tokenizer

    _check_queue_len(max_queue_len)
    frontend = EngineCoreClient.launch(
        engine_args,
        loras,
        max_queue_len=max_queue_len,
        log_level=log_level,
        torch_threads=torch_threads,
    )
    facts = frontend.facts
    # The frontend tokenizes and templates; the engine detokenizes with its own copy.
    tokenizer = load_tokenizer(facts.tokenizer_path, facts.eos_token_ids)
    return _build(
        frontend,
        facts,
        tokenizer,
        served_model_name=served_model_name,
        max_request_bytes=max_request_bytes,
        max_seqs_per_request=max_seqs_per_request,
        api_key=api_key,
        chat_template=chat_template,
    )


def _check_queue_len(max_queue_len: int) -> None:
    if max_queue_len < 0:
        raise ValueError(f"max_queue_len must be >= 0, got {max_queue_len}")


def _build(frontend, facts, tokenizer, *, served_model_name, max_seqs_per_request, **options):
    from tesela.server.protocol import ModelInfo
    from tesela.server.routes import build_app

    chat_template = options.pop("chat_template")
    if chat_template is not None:
        tokenizer.chat_template = load_chat_template(chat_template)
    model = facts.model
    name = served_model_name or model
    aliases = tuple({model, Path(model).name, Path(model.rstrip("/")).name} - {name})
    info = ModelInfo(
        name=name,
        aliases=aliases,
        max_model_len=facts.max_model_len,
        vocab_size=facts.vocab_size,
        tokenizer=tokenizer,
        adapters={lora.lora_name: lora for lora in facts.loras},
        sampling_defaults=dict(facts.sampling_defaults),
        max_seqs_per_request=max_seqs_per_request or facts.max_num_seqs,
    )
    return build_app(frontend, info, **options)


# ---- the command line -----------------------------------------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server options")
    group.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)"
    )
    group.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    group.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients send (default: --model as given)",
    )
    group.add_argument(
        "--api-key",
        default=os.environ.get("TESELA_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $TESELA_API_KEY, "
        "else none)",
    )
    group.add_argument(
        "--chat-template",
        default=None,
        help="a jinja chat template (a file, or the text) instead of the tokenizer's",
    )
    group.add_argument(
        "--max-queue-len",
        type=int,
        default=DEFAULT_MAX_QUEUE_LEN,
        help="requests that may wait beyond --max-num-seqs before the server answers 503",
    )
    group.add_argument(
        "--max-seqs-per-request",
        type=int,
        default=None,
        help="most sequences (prompts x n) one request may ask for (default: --max-num-seqs)",
    )
    group.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="larger request bodies get 413",
    )
    group.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT,
        help="seconds running requests get to finish after SIGTERM before they are cut off",
    )
    group.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level",
    )
    group.add_argument("--no-access-log", action="store_true", help="no line per request")
    group.add_argument(
        "--engine-in-process",
        action="store_true",
        help="run the engine on a thread of the server process instead of an engine-core "
        "process of its own (the engine loop then shares the GIL with HTTP and streaming work)",
    )
    group.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="LoRA adapters to serve (PEFT folders); a request's 'model' picks one by name "
        "(turns LoRA on)",
    )
    EngineArgs.add_cli_args(parser)


def parse_lora_modules(specs: list[str]) -> list[LoRARequest]:
    loras = []
    for index, spec in enumerate(specs, start=1):
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules takes NAME=PATH entries, got {spec!r}")
        loras.append(LoRARequest(name, index, path))
    return loras


def bind_socket(host: str, port: int) -> socket.socket:
    """Take the port before the model loads, so a busy port fails in a second, not minutes."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            f"cannot listen on {host}:{port} ({exc.strerror}): another server may hold it; "
            "stop it or pass another --port"
        ) from None
    return sock


def run_serve(args: argparse.Namespace) -> int:
    require_server_dependencies()
    import uvicorn

    from tesela.server.shutdown import GracefulServer

    try:
        loras = parse_lora_modules(args.lora_modules)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sock = bind_socket(args.host, args.port)
    app = _serve_app(args, loras)
    max_model_len = app.state.server.model_info.max_model_len
    port = sock.getsockname()[1]
    print(
        f"serving {args.served_model_name or args.model} at http://{args.host}:{port}/v1 "
        f"(max_model_len {max_model_len})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn_config = uvicorn.Config(
        app,
        log_level=args.log_level,
        access_log=not args.no_access_log,
        # A backstop only: GracefulServer cuts requests off after the drain timeout.
        timeout_graceful_shutdown=args.drain_timeout + 10,
    )
    GracefulServer(uvicorn_config, drain_timeout=args.drain_timeout).run(sockets=[sock])
    return 0


def _serve_app(args: argparse.Namespace, loras: list[LoRARequest]):
    """The app `tesela serve` runs: its engine in an engine-core process (default) or on a
    thread of this one (--engine-in-process)."""
    engine_args = EngineArgs.from_cli_args(args)
    if loras:
        engine_args = engine_args.replace(enable_lora=True)
    options = dict(
        served_model_name=args.served_model_name,
        max_queue_len=args.max_queue_len,
        max_request_bytes=args.max_request_bytes,
        max_seqs_per_request=args.max_seqs_per_request,
        api_key=args.api_key,
        chat_template=args.chat_template,
    )
    if not args.engine_in_process:
        log_level = getattr(logging, args.log_level.upper())
        return create_process_app(engine_args, loras, log_level=log_level, **options)
    from tesela.engine.llm_engine import LLMEngine, make_engine_config

    config, path = make_engine_config(engine_args)
    engine = LLMEngine(config, path)
    for lora in loras:
        engine.add_lora(lora)
    return create_app(engine, **options)


def main(argv: list[str] | None = None) -> int:
    """`python -m tesela.server`: the same as `tesela serve`."""
    parser = argparse.ArgumentParser(prog="python -m tesela.server", description=__doc__)
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


# ---- in-process server (tests, benchmarks) --------------------------------------------------


class ServerThread:
    """Runs an app under uvicorn on a background thread, on a port of its own."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app = app
        self.host = host
        self.port = port
        self.log_level = log_level
        self.server = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> str:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))  # port 0: the OS picks a free one
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level=self.log_level, access_log=False, timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="tesela-uvicorn", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url} within {timeout} s")
            time.sleep(0.02)
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
