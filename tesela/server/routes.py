"""The HTTP layer on Starlette: routes, OpenAI-style errors, SSE and disconnect handling.

Starlette (not FastAPI) keeps the dependency set small and pure Python (no pydantic-core);
validation lives in protocol.py anyway. Every error a client can cause leaves as an OpenAI
error body with a 4xx status; overload is a 503 with Retry-After; anything unexpected is a
500 in the same shape, and never disturbs the other requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from tesela.engine.llm_engine import LLMEngine
from tesela.server.async_engine import AsyncEngine, EngineError, Overloaded
from tesela.server.metrics import ServerMetrics
from tesela.server.protocol import (
    APIError,
    GenerationRequest,
    ModelInfo,
    parse_chat,
    parse_completion,
    parse_json_body,
)
from tesela.server.serving import TokenText, collect, make_format, stream_events

logger = logging.getLogger("tesela.server")

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/stats")


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


class Server:
    """The routes' shared state: the async engine, the model's facts, the metrics."""

    def __init__(self, engine: LLMEngine, model_info: ModelInfo, max_queue_len: int) -> None:
        self.metrics = ServerMetrics()
        self.engine = AsyncEngine(engine, max_queue_len=max_queue_len, metrics=self.metrics)
        self.model_info = model_info
        self.token_text = TokenText(engine.tokenizer)
        self.started = int(time.time())

    # ---- endpoints -----------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, parse_completion, "cmpl")

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, parse_chat, "chatcmpl")

    async def models(self, request: Request) -> Response:
        info = self.model_info
        card = {
            "id": info.name,
            "object": "model",
            "created": self.started,
            "owned_by": "tesela",
            "max_model_len": info.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        if self.engine.is_running:
            return JSONResponse({"status": "ok"})
        reason = self.engine.dead_reason or "not started"
        return error_response(
            APIError(f"the engine is not running: {reason}", 503, type="server_error")
        )

    async def stats(self, request: Request) -> Response:
        return JSONResponse(self.engine.stats())

    async def prometheus(self, request: Request) -> Response:
        text = self.metrics.render(self.engine.stats())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # ---- generation ----------------------------------------------------------------------

    async def _generate(self, request: Request, parse, id_prefix: str) -> Response:
        try:
            raw = await request.body()
        except ClientDisconnect:
            return Response(status_code=499)  # gone before the body arrived
        try:
            generation = parse(parse_json_body(raw), self.model_info)
            request_id = f"{id_prefix}-{uuid.uuid4().hex}"
            group = await self._submit(generation, request_id)
        except APIError as error:
            headers = {"Retry-After": "1"} if error.status == 503 else None
            return error_response(error, headers)
        self.metrics.prompt_tokens.inc(generation.num_prompt_tokens)
        fmt = make_format(generation, request_id, self.token_text)
        if generation.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return EventStreamResponse(stream_events(group, fmt), headers=headers)
        try:
            outputs = await until_disconnected(request, collect(group))
        except EngineError as exc:
            return error_response(APIError(str(exc), 500, type="server_error", code="engine_error"))
        finally:
            group.abort()  # a no-op once finished; frees the blocks if the client left
        if outputs is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        return JSONResponse(fmt.response(outputs))

    async def _submit(self, generation: GenerationRequest, request_id: str):
        prompts = [generation.prompts[p] for p in generation.choice_prompts]
        try:
            return await self.engine.submit(
                prompts, generation.choice_params, request_id, cache_salt=generation.cache_salt
            )
        except Overloaded as exc:
            self.metrics.requests_rejected.inc(1, "overloaded")
            raise APIError(str(exc), 503, type="server_error", code="overloaded") from None
        except ValueError as exc:  # the engine refused the input (e.g. longer than the KV cache)
            self.metrics.requests_rejected.inc(1, "invalid")
            raise APIError(str(exc), 400, code="invalid_value") from None
        except EngineError as exc:
            raise APIError(str(exc), 503, type="server_error", code="engine_unavailable") from None


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
        "chat/completions, models), plus /health, /metrics and /stats",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(exc.status_code, str(exc.detail))
    return error_response(
        APIError(message, exc.status_code, code="not_found" if exc.status_code == 404 else None)
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s", request.url.path, exc_info=exc)
    message = f"internal server error ({type(exc).__name__}): see the server log"
    return error_response(APIError(message, 500, type="server_error", code="internal_error"))


def build_app(engine: LLMEngine, model_info: ModelInfo, max_queue_len: int) -> Starlette:
    server = Server(engine, model_info, max_queue_len)

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
        ("/health", server.health, ["GET"]),
        ("/stats", server.stats, ["GET"]),
        ("/metrics", server.prometheus, ["GET"]),
    ]
    app = Starlette(
        routes=[Route(path, fn, methods=methods) for path, fn, methods in endpoints],
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )
    app.add_middleware(MetricsMiddleware, metrics=server.metrics)
    app.state.server = server
    return app
