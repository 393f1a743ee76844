"""Prefix caching as the OpenAI API reports it: `usage.prompt_tokens_details.cached_tokens` in
completions and chat (whole and streamed), `cache_salt` in the request body, and the hit rate
in /metrics and /stats. A real server on loopback with the tiny model (block size 16), driven
by the `openai` client."""

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


def test_cache_salt_keeps_prefixes_apart(server):
    api = client(server)
    prompt = "A tenant's private prompt that another tenant must not hit in the cache. " * 2

    def send(salt):
        extra = {"cache_salt": salt} if salt else {}
        return api.completions.create(
            model="tiny", prompt=prompt, max_tokens=3, temperature=0, extra_body=extra
        )

    first = send("tenant-a")
    assert cached(send("tenant-b").usage) == 0 and cached(send(None).usage) == 0
    again = send("tenant-a")
    assert cached(again.usage) == expected_hit(again.usage.prompt_tokens)
    assert again.choices[0].text == first.choices[0].text
    bad = httpx.post(
        server.url + "/v1/completions",
        json={"model": "tiny", "prompt": "x", "cache_salt": 7},
        timeout=TIMEOUT,
    )
    assert bad.status_code == 400 and "cache_salt" in bad.json()["error"]["message"]


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


def test_bench_serve_shared_prefix_workload_runs_cache_on_and_off(tmp_path, capsys):
    import argparse
    import json

    from tesela.bench.serve import add_bench_serve_arguments, run_bench_serve

    parser = argparse.ArgumentParser()
    add_bench_serve_arguments(parser)
    sizes = "--num-system-prompts 2 --system-prompt-len 96 --user-len 8,16 --output-len 4,6"
    sizes += " --num-prompts 12 --num-conversations 3 --num-turns 3 --concurrency 4"
    args = parser.parse_args(
        ["--workload", "shared-prefix", "--in-process", "--output-dir", str(tmp_path)]
        + sizes.split()
    )
    assert run_bench_serve(args) == 0
    results = json.loads(next(tmp_path.glob("serve-prefix-*.json")).read_text())
    on, off = results["runs"]["cache on"], results["runs"]["cache off"]
    assert on["system-prompts"]["completed"] == off["system-prompts"]["completed"] == 12
    assert on["conversations"]["completed"] == off["conversations"]["completed"] == 9
    assert on["system-prompts"]["hit_rate"] > 0 and on["conversations"]["hit_rate"] > 0
    assert off["system-prompts"]["hit_rate"] == off["conversations"]["hit_rate"] == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("system-prompts: TTFT p50") and "target >= 3x" in lines[-2]
    assert lines[-1].startswith("conversations: TTFT p50")
