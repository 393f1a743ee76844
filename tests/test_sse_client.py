"""The serving benchmark's HTTP client (tesela/bench/sse_client.py) against real sockets: SSE
events cut anywhere by the transport, chunked and close-delimited bodies, non-200 answers."""

from __future__ import annotations

import asyncio
import json

import pytest

from tesela.bench.sse_client import HTTPStatusError, sse_events

EVENTS = [json.dumps({"choices": [{"text": f"tok{i} é"}]}) for i in range(5)] + ["[DONE]"]
STREAM = "".join(f"data: {e}\n\n" for e in EVENTS).encode()


async def _serve_once(respond) -> tuple[asyncio.AbstractServer, str]:
    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        request = json.loads(await reader.readexactly(length))
        await respond(writer, request)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def _collect(respond) -> list[str]:
    server, url = await _serve_once(respond)
    async with server:
        return [event async for event in sse_events(url, "/v1/completions", {"prompt": [1]})]


def _chunked(pieces: list[bytes], status: bytes = b"200 OK") -> bytes:
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces)
    head = b"HTTP/1.1 " + status + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + body + b"0\r\n\r\n"


@pytest.mark.parametrize("cut", [1, 7, 33, len(STREAM)])
def test_events_cut_across_chunks_arrive_whole_and_in_order(cut):
    pieces = [STREAM[i : i + cut] for i in range(0, len(STREAM), cut)]

    async def respond(writer, request):
        assert request == {"prompt": [1]}
        for i in range(0, len(_chunked(pieces)), 5):  # and the chunk framing cut in 5s
            writer.write(_chunked(pieces)[i : i + 5])
            await writer.drain()

    assert asyncio.run(_collect(respond)) == EVENTS


def test_a_body_delimited_by_close_is_read_to_the_end():
    async def respond(writer, request):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + STREAM)

    assert asyncio.run(_collect(respond)) == EVENTS


def test_a_non_200_answer_raises_with_its_status_and_body():
    async def respond(writer, request):
        writer.write(_chunked([b'{"error": "bad"}'], status=b"400 Bad Request"))

    with pytest.raises(HTTPStatusError, match="HTTP 400") as info:
        asyncio.run(_collect(respond))
    assert info.value.status == 400 and "bad" in str(info.value)


def test_only_plain_http_urls_are_accepted():
    async def run():
        return [e async for e in sse_events("https://example.com", "/x", {})]

    with pytest.raises(ValueError, match="plain http"):
        asyncio.run(run())
