"""Entry points of the OpenAI-compatible server: `create_app`, `tesela serve`, ServerThread.

This module imports no web framework at import time, so the CLI can always offer `serve`
and say how to install what is missing; the HTTP layer itself is in routes.py.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

from tesela.engine.llm_engine import LLMEngine
from tesela.lora.request import LoRARequest

DEFAULT_MAX_QUEUE_LEN = 1024


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
):
    """A Starlette app serving `engine`; its engine thread starts with the app's lifespan.

    `max_queue_len` bounds how many requests may wait beyond `max_num_seqs` running ones;
    past that the server answers 503 instead of queueing without limit."""
    require_server_dependencies()
    from tesela.server.protocol import ModelInfo
    from tesela.server.routes import build_app

    if max_queue_len < 0:
        raise ValueError(f"max_queue_len must be >= 0, got {max_queue_len}")
    model = engine.config.model
    name = served_model_name or model
    aliases = tuple({model, Path(model).name, Path(model.rstrip("/")).name} - {name})
    info = ModelInfo(
        name=name,
        aliases=aliases,
        max_model_len=engine.config.scheduler.max_model_len,
        vocab_size=engine.config.model_config.vocab_size,
        tokenizer=engine.tokenizer,
        adapters={lora.lora_name: lora for lora in engine.list_loras()},
    )
    return build_app(engine, info, max_queue_len)


# ---- the command line -----------------------------------------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from tesela.cli import add_engine_arguments

    add_engine_arguments(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients send (default: --model as given)",
    )
    parser.add_argument(
        "--max-queue-len",
        type=int,
        default=DEFAULT_MAX_QUEUE_LEN,
        help="requests that may wait beyond --max-num-seqs before the server "
        "answers 503 (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.add_argument("--no-access-log", action="store_true")
    parser.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="LoRA adapters to serve (PEFT folders); a request's 'model' picks one by name "
        "(turns LoRA on)",
    )


def parse_lora_modules(specs: list[str]) -> list[LoRARequest]:
    loras = []
    for index, spec in enumerate(specs, start=1):
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules takes NAME=PATH entries, got {spec!r}")
        loras.append(LoRARequest(name, index, path))
    return loras


def run_serve(args: argparse.Namespace) -> int:
    from tesela.cli import engine_kwargs
    from tesela.engine.llm_engine import make_engine_config

    require_server_dependencies()
    import uvicorn

    if not 0 <= args.port <= 65535:
        print(f"error: --port must be in [0, 65535], got {args.port}", file=sys.stderr)
        return 2
    try:
        loras = parse_lora_modules(args.lora_modules)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kwargs = engine_kwargs(args)
    kwargs["enable_lora"] = kwargs["enable_lora"] or bool(loras)
    config, path = make_engine_config(args.model, **kwargs)
    engine = LLMEngine(config, path)
    for lora in loras:
        engine.add_lora(lora)
    app = create_app(
        engine, served_model_name=args.served_model_name, max_queue_len=args.max_queue_len
    )
    print(
        f"serving {args.served_model_name or args.model} at http://{args.host}:{args.port}/v1 "
        f"(max_model_len {config.scheduler.max_model_len})",
        file=sys.stderr,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=not args.no_access_log,
        timeout_graceful_shutdown=5,
    )
    return 0


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
