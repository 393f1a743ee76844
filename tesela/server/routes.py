"""The HTTP layer on Starlette: routes, OpenAI-style errors, SSE and disconnect handling.

Starlette (not FastAPI) keeps the dependency set small and pure Python (no pydantic-core);
validation lives in protocol.py anyway. Every error a client can cause leaves as an OpenAI
error body with a 4xx status; overload is a 503 with Retry-After; anything unexpected is a
500 in the same shape (logged once under the request id it carries), and never disturbs the
other requests in flight or the client's keep-alive connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tesela import __version__
from tesela.lora.request import LoRARequest
from tesela.server.async_engine import AsyncEngine, EngineError, Overloaded, ShuttingDown
from tesela.server.core_client import EngineCoreClient
from tesela.server.metrics import ServerMetrics
from tesela.server.protocol import (
    APIError,
    GenerationRequest,
    ModelInfo,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_json_body,
    parse_tokenize,
)
from tesela.server.serving import TokenText, collect, make_format, stream_events

logger = logging.getLogger("tesela.server")

ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/health",
    "/metrics",
    "/stats",
    "/tokenize",
    "/detokenize",
    "/version",
)
# Paths that need the API key when the server has one (vLLM guards /v1 the same way).
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20
# Requests whose JSON is parsed, tokenized and templated at the same time, on worker threads.
PREPROCESS_THREADS = 8
# Bodies up to this size are parsed and tokenized on the event loop (a 2,000-token prompt as
# ids or text is a few KiB); larger ones go to the preprocessing threads.
INLINE_PREPROCESS_BYTES = 16 * 2**10


class EventStreamResponse(StreamingResponse):
    """SSE that always watches for the client leaving and then cancels the stream (whose
    `finally` aborts the request), whatever ASGI spec version the server speaks."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as task_group:

            async def stream() -> None:
                await self.stream_response(send)
                task_group.cancel_scope.cancel()

            task_group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            task_group.cancel_scope.cancel()


class MetricsMiddleware:
    """Counts every HTTP request by route and status, including errors and 404s."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_with_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.http_requests.inc(1, route, str(status[0]))


def error_response(error: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class RequestTooLarge(Exception):
    """The body went past the server's limit while it was being read."""


class GuardMiddleware:
    """Per HTTP request: an id (the X-Request-Id header of every response), the API key, the
    body-size limit, and the last line of defence against bugs. An unexpected exception is
    logged once, with the request id, and answered with a 500 that carries the id and no
    internal text; it is never re-raised, so the server keeps the connection alive."""

    def __init__(self, app, *, max_request_bytes: int, api_key: str | None) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.api_key = api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = [False]

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                started[0] = True
                message = dict(message)
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await error_response(refusal)(scope, receive, send_with_id)
            return
        try:
            await self.app(scope, self._limited(receive), send_with_id)
        except RequestTooLarge:
            if not started[0]:
                await error_response(self._too_large())(scope, receive, send_with_id)
        except Exception as exc:
            logger.error(
                "request %s: unhandled error on %s", request_id, scope["path"], exc_info=exc
            )
            if not started[0]:
                error = APIError(
                    f"internal server error: the server logged it as request {request_id}",
                    500,
                    type="server_error",
                    code="internal_error",
                )
                await error_response(error)(scope, receive, send_with_id)

    def _refusal(self, scope) -> APIError | None:
        headers = dict(scope.get("headers", []))
        if self.api_key is not None and scope["path"].startswith(PROTECTED_PREFIXES):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return APIError(
                    "missing or wrong API key: send 'Authorization: Bearer <key>' with the key "
                    "the server was started with (--api-key)",
                    401,
                    code="invalid_api_key",
                )
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_request_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(
            f"the request body is larger than this server accepts ({self.max_request_bytes} "
            "bytes): send a shorter prompt, or start the server with a larger "
            "--max-request-bytes",
            413,
            code="request_too_large",
        )

    def _limited(self, receive):
        received = [0]

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > self.max_request_bytes:
                    raise RequestTooLarge
            return message

        return limited_receive


class Server:
    """The routes' shared state: the engine (an engine-core process's client, or the
    in-process AsyncEngine: the same interface), the model's facts, the metrics."""

    def __init__(self, engine: EngineCoreClient | AsyncEngine, model_info: ModelInfo) -> None:
        self.metrics = ServerMetrics(model_info.name)
        self.engine = engine
        engine.metrics = self.metrics
        self.model_info = model_info
        self.token_text = TokenText(model_info.tokenizer)
        self.started = int(time.time())
        self._lora_ids = itertools.count(
            1 + max((a.lora_int_id for a in model_info.adapters.values()), default=0)
        )
        self.preprocess_limiter = anyio.CapacityLimiter(PREPROCESS_THREADS)

    # ---- endpoints -----------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, parse_completion, "cmpl", inline=True)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, parse_chat, "chatcmpl")

    def _model_card(self) -> dict:
        info = self.model_info
        return {
            "id": info.name,
            "object": "model",
            "created": self.started,
            "owned_by": "tesela",
            "root": info.name,
            "parent": None,
            "max_model_len": info.max_model_len,
        }

    def _model_cards(self) -> list[dict]:
        """The base model, then every LoRA adapter served on top of it."""
        card, info = self._model_card(), self.model_info
        return [card] + [
            dict(card, id=name, root=lora.lora_path, parent=info.name)
            for name, lora in sorted(info.adapters.items())
        ]

    # ---- LoRA adapters at run time ---------------------------------------------------------

    async def load_lora_adapter(self, request: Request) -> Response:
        """POST {"lora_name": ..., "lora_path": ...}: validate and serve a new adapter."""
        try:
            body = parse_json_body(await request.body())
            name, path = _lora_field(body, "lora_name"), _lora_field(body, "lora_path")
            if self.model_info.accepts(name):
                raise APIError(f"the name {name!r} is already served: pick another lora_name")
            lora = LoRARequest(name, next(self._lora_ids), path)
            await self.engine.add_lora(lora)
        except APIError as error:
            return error_response(error)
        except (ValueError, FileNotFoundError) as exc:  # the adapter does not fit this model
            return error_response(APIError(str(exc), 400, param="lora_path", code="invalid_lora"))
        self.model_info.adapters[name] = lora
        return JSONResponse({"status": "ok", "lora_name": name, "lora_int_id": lora.lora_int_id})

    async def unload_lora_adapter(self, request: Request) -> Response:
        """POST {"lora_name": ...}: stop serving an adapter (refused while requests use it)."""
        try:
            name = _lora_field(parse_json_body(await request.body()), "lora_name")
            lora = self.model_info.adapters.get(name)
            if lora is None:
                raise APIError(
                    f"no LoRA adapter named {name!r} is loaded", 404, code="lora_not_found"
                )
            await self.engine.remove_lora(lora.lora_int_id)
        except APIError as error:
            return error_response(error)
        except ValueError as exc:
            return error_response(APIError(str(exc), 409, code="lora_in_use"))
        del self.model_info.adapters[name]
        return JSONResponse({"status": "ok", "lora_name": name})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": self._model_cards()})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model_id"]
        if not self.model_info.accepts(name):
            return error_response(
                APIError(
                    f"the model {name!r} does not exist here: this server serves "
                    f"{self.model_info.name!r}",
                    404,
                    param="model",
                    code="model_not_found",
                )
            )
        cards = {card["id"]: card for card in self._model_cards()}
        return JSONResponse(cards.get(name, self._model_card()))  # an alias: the base model

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def tokenize(self, request: Request) -> Response:
        def run(raw: bytes) -> dict:
            tokens = parse_tokenize(parse_json_body(raw), self.model_info)
            return {
                "tokens": tokens,
                "count": len(tokens),
                "max_model_len": self.model_info.max_model_len,
            }

        return await self._preprocessed(request, run)

    async def detokenize(self, request: Request) -> Response:
        def run(raw: bytes) -> dict:
            tokens = parse_detokenize(parse_json_body(raw), self.model_info)
            return {"prompt": self.model_info.tokenizer.decode(tokens)}

        return await self._preprocessed(request, run)

    async def health(self, request: Request) -> Response:
        if self.engine.is_running and not self.engine.draining:
            return JSONResponse({"status": "ok"})
        reason = (
            "shutting down" if self.engine.draining else self.engine.dead_reason or "not started"
        )
        return error_response(
            APIError(f"the engine is not running: {reason}", 503, type="server_error")
        )

    async def stats(self, request: Request) -> Response:
        return JSONResponse(await self.engine.fetch_stats())

    async def prometheus(self, request: Request) -> Response:
        text = self.metrics.render(await self.engine.fetch_stats())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # ---- generation ----------------------------------------------------------------------

    async def _preprocess(self, function, raw: bytes, inline: bool = False):
        """JSON parsing, tokenization and templating on a worker thread, so a large request
        never holds the event loop (and /health and streams stay responsive). `inline`: the
        work is bounded by the body's size (no chat template), so a small body is done right
        here, in tens of microseconds: the thread hop is not free, the worker waits for the
        GIL the busy loop holds, milliseconds of TTFT under load."""
        if inline and len(raw) <= INLINE_PREPROCESS_BYTES:
            return function(raw)
        return await anyio.to_thread.run_sync(function, raw, limiter=self.preprocess_limiter)

    async def _preprocessed(self, request: Request, function) -> Response:
        try:
            raw = await request.body()
        except ClientDisconnect:
            return Response(status_code=499)
        try:
            return JSONResponse(await self._preprocess(function, raw))
        except APIError as error:
            return error_response(error)

    async def _generate(self, request: Request, parse, id_prefix: str, inline=False) -> Response:
        try:
            raw = await request.body()
        except ClientDisconnect:
            return Response(status_code=499)  # gone before the body arrived
        try:
            generation = await self._preprocess(
                lambda body: parse(parse_json_body(body), self.model_info), raw, inline
            )
            request_id = f"{id_prefix}-{request.scope['state']['request_id']}"
            group = await self._submit(generation, request_id)
        except APIError as error:
            headers = {"Retry-After": "1"} if error.status == 503 else None
            return error_response(error, headers)
        self.metrics.prompt_tokens.inc(generation.num_prompt_tokens)
        adapter = generation.model if generation.model in self.model_info.adapters else ""
        self.metrics.lora_requests.inc(1, adapter)
        fmt = make_format(generation, request_id, self.token_text)
        if generation.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return EventStreamResponse(stream_events(group, fmt), headers=headers)
        try:
            outputs = await until_disconnected(request, collect(group))
        except ShuttingDown as exc:
            return error_response(
                APIError(str(exc), 503, type="server_error", code="shutting_down"),
                {"Retry-After": "1"},
            )
        except EngineError as exc:
            return error_response(APIError(str(exc), 500, type="server_error", code="engine_error"))
        finally:
            group.abort()  # a no-op once finished; frees the blocks if the client left
        if outputs is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        return JSONResponse(fmt.response(outputs))

    async def _submit(self, generation: GenerationRequest, request_id: str):
        prompts = [generation.prompts[p] for p in generation.choice_prompts]
        lora = self.model_info.adapters.get(generation.model)
        try:
            return await self.engine.submit(
                prompts,
                generation.choice_params,
                request_id,
                cache_salt=generation.cache_salt,
                lora_request=lora,
            )
        except Overloaded as exc:
            self.metrics.requests_rejected.inc(1, "overloaded")
            raise APIError(str(exc), 503, type="server_error", code="overloaded") from None
        except ValueError as exc:  # the engine refused the input (e.g. longer than the KV cache)
            self.metrics.requests_rejected.inc(1, "invalid")
            raise APIError(str(exc), 400, code="invalid_value") from None
        except ShuttingDown as exc:
            raise APIError(str(exc), 503, type="server_error", code="shutting_down") from None
        except EngineError as exc:
            raise APIError(str(exc), 503, type="server_error", code="engine_unavailable") from None


def _lora_field(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise APIError(f"'{name}' is required and must be a non-empty string", param=name)
    return value


async def until_disconnected(request: Request, work: Awaitable):
    """Await `work` unless the client disconnects first (then cancel it and return None)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():  # cancelled: the client left first
        return None
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {
        404: f"no route {request.url.path}: the API lives under /v1 (completions, "
        "chat/completions, models), plus /health, /metrics, /stats, /tokenize, /detokenize "
        "and /version",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(exc.status_code, str(exc.detail))
    return error_response(
        APIError(message, exc.status_code, code="not_found" if exc.status_code == 404 else None)
    )


def build_app(
    engine: EngineCoreClient | AsyncEngine,
    model_info: ModelInfo,
    *,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    api_key: str | None = None,
) -> Starlette:
    server = Server(engine, model_info)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.engine.shutdown)

    endpoints: list[tuple[str, Callable, list[str]]] = [
        ("/v1/completions", server.completions, ["POST"]),
        ("/v1/chat/completions", server.chat_completions, ["POST"]),
        ("/v1/models", server.models, ["GET"]),
        ("/v1/load_lora_adapter", server.load_lora_adapter, ["POST"]),
        ("/v1/unload_lora_adapter", server.unload_lora_adapter, ["POST"]),
        ("/v1/models/{model_id:path}", server.model, ["GET"]),
        ("/tokenize", server.tokenize, ["POST"]),
        ("/detokenize", server.detokenize, ["POST"]),
        ("/version", server.version, ["GET"]),
        ("/health", server.health, ["GET"]),
        ("/stats", server.stats, ["GET"]),
        ("/metrics", server.prometheus, ["GET"]),
    ]
    app = Starlette(
        routes=[Route(path, fn, methods=methods) for path, fn, methods in endpoints],
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error},
    )
    # Outermost last: metrics see every status, including the guard's 401/413/500.
    app.add_middleware(GuardMiddleware, max_request_bytes=max_request_bytes, api_key=api_key)
    app.add_middleware(MetricsMiddleware, metrics=server.metrics)
    app.state.server = server
    return app
