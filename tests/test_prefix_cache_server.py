"""Prefix caching as the OpenAI API reports it: `usage.prompt_tokens_details.cached_tokens` in
completions and chat (whole and streamed), and the hit rate in /metrics and /stats. A real
server on loopback with the tiny model (block size 16), driven by the `openai` client."""

from __future__ import annotations

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from test_server import TIMEOUT, client, metric, start_server  # noqa: E402


@pytest.fixture(scope="module")
def server():
    server, _ = start_server()
    yield server
    server.stop()


def cached(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def expected_hit(prompt_tokens: int, block_size: int = 16) -> int:
    # Full blocks only, and never the block of the last prompt token (it runs for logits).
    return (prompt_tokens - 1) // block_size * block_size


def test_completion_usage_reports_cached_tokens(server):
    api = client(server)
    prompt = "A long shared system prompt that many requests repeat word for word. " * 2
    first = api.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
    assert cached(first.usage) == 0
    second = api.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
    assert second.choices[0].text == first.choices[0].text
    assert cached(second.usage) == expected_hit(second.usage.prompt_tokens) > 0
    chunks = list(
        api.completions.create(
            model="tiny",
            prompt=prompt + "and a new question?",
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert cached(chunks[-1].usage) == expected_hit(second.usage.prompt_tokens)


def test_chat_usage_reports_cached_tokens_streamed_and_not(server):
    api = client(server)
    system = {"role": "system", "content": "You answer in the style of a very long manual. " * 2}
    turn = [system, {"role": "user", "content": "first question"}]
    first = api.chat.completions.create(model="tiny", messages=turn, max_tokens=3, temperature=0)
    assert cached(first.usage) == 0
    chunks = list(
        api.chat.completions.create(
            model="tiny",
            messages=[system, {"role": "user", "content": "another question"}],
            max_tokens=3,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert cached(chunks[-1].usage) >= 64  # the system prompt's full blocks


def test_metrics_and_stats_report_the_hit_rate(server):
    api = client(server)
    prompt = "Metrics prefix that is repeated across two requests. " * 2
    for _ in range(2):
        api.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    stats = httpx.get(server.url + "/stats", timeout=TIMEOUT).json()
    assert stats["prefix_caching"] is True
    assert stats["prefix_cache_hit_tokens"] > 0 and stats["kv_blocks_cached"] > 0
    assert metric(server, "tesela_prefix_cache_hits_total") == stats["prefix_cache_hit_tokens"]
    assert 0 < metric(server, "tesela_prefix_cache_hit_rate") < 1
    assert metric(server, "tesela_kv_blocks_cached") > 0
