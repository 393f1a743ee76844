"""A lean HTTP/1.1 client for the serving benchmark's streaming requests (plain http only).

Why not httpx: at concurrency 32 a server streams over 10,000 SSE events a second, and httpx's
streaming stack (httpcore, anyio, its line decoder) costs the load generator tens of
microseconds per event, so the generator, not the server, set the measured TTFT and ITL tails.
This client does only what the benchmark needs: one connection per request (`Connection:
close`: loopback connects cost microseconds), a JSON POST, the status line and headers, then the
body (chunked or not) cut into SSE `data:` payloads as they arrive.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class HTTPStatusError(RuntimeError):
    """A non-200 answer: its status and the start of its body."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"the benchmark's client speaks plain http only, got {url!r}")
    return parts.hostname, parts.port or 80


async def sse_events(url: str, path: str, body: dict) -> AsyncIterator[str]:
    """POST `body` as JSON to url + path; yield each SSE `data:` payload (text) as it arrives.
    Raises HTTPStatusError for a non-200 answer."""
    host, port = _address(url)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        payload = json.dumps(body).encode()
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        status, headers = await _read_head(reader)
        chunks = _chunked(reader) if headers.get("transfer-encoding") == "chunked" else None
        if status != 200:
            raise HTTPStatusError(status, await _read_all(reader, chunks))
        pending = b""
        async for data in chunks or _until_close(reader):
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.startswith(b"data: "):
                    yield line[6:].rstrip(b"\r").decode()
    finally:
        writer.close()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip().lower()
    return status, headers


async def _chunked(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            return
        data = await reader.readexactly(size + 2)  # the chunk and its CRLF
        yield data[:-2]


async def _until_close(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while data := await reader.read(65536):
        yield data


async def _read_all(reader: asyncio.StreamReader, chunks) -> bytes:
    return b"".join([data async for data in chunks or _until_close(reader)])
