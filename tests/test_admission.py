"""Nothing is cut short silently: admission refuses what can never fit, a max_model_len larger
than the KV pool is lowered with a warning, and a stop string at the very start of the output
is cut like any other. Offline, and against a live server on loopback."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from tesela import LLM, SamplingParams
from tesela.config import SchedulerConfig
from tesela.engine.block_manager import BlockManager
from tesela.engine.request import Request
from tesela.engine.scheduler import Scheduler

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
TIMEOUT = 30.0


def request(num_prompt_tokens: int, max_tokens: int, rid: str = "r") -> Request:
    prompt = list(range(1, num_prompt_tokens + 1))
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens))


def test_scheduler_refuses_prompt_plus_max_tokens_beyond_max_model_len():
    scheduler = Scheduler(SchedulerConfig(max_model_len=32), BlockManager(64, 4))
    scheduler.add(request(20, 12, "fits"))  # exactly 32
    with pytest.raises(ValueError, match="33 tokens exceed max_model_len 32.*at most 12"):
        scheduler.add(request(20, 13, "one-too-many"))
    assert [r.request_id for r in scheduler.waiting] == ["fits"]


def test_scheduler_refuses_a_request_the_pool_can_never_hold():
    # 3 usable blocks of 4: 12 slots. The last sampled token needs no slot.
    scheduler = Scheduler(SchedulerConfig(max_model_len=64), BlockManager(4, 4))
    scheduler.add(request(8, 5, "fits"))  # 12 cached tokens
    with pytest.raises(ValueError, match="KV slots for 13, but the KV cache holds only 12"):
        scheduler.add(request(8, 6, "too-big"))


def test_engine_lowers_max_model_len_to_the_pool_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="tesela.engine"):
        llm = LLM("tiny", num_kv_tokens=64, block_size=16, max_model_len=256)
    assert llm.engine.config.scheduler.max_model_len == 64
    assert llm.engine.scheduler.config.max_model_len == 64
    assert any("256" in r.message and "64 tokens" in r.message for r in caplog.records)
    # A request that fits the pool exactly runs to max_tokens; one more token is refused.
    output = llm.generate([1] * 16, SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))
    assert len(output[0].token_ids) == 48 and output[0].finish_reason == "length"
    with pytest.raises(ValueError, match="exceed max_model_len 64"):
        llm.generate([1] * 16, SamplingParams(max_tokens=49))
    assert not llm.engine.has_unfinished()


def first_char_stop(llm, prompt: str) -> tuple[str, str]:
    """The greedy text of `prompt` and a stop string equal to its first character."""
    full = llm.generate(prompt, GREEDY)[0].text
    assert full, "the model produced no text"
    return full, full[0]


@pytest.fixture(scope="module")
def tiny():
    return LLM("tiny")


def test_a_stop_string_at_the_start_of_the_output_is_cut_offline(tiny):
    full, stop = first_char_stop(tiny, "hello")
    cut = tiny.generate("hello", SamplingParams(**{**GREEDY.__dict__, "stop": (stop,)}))[0]
    assert cut.text == "" and cut.finish_reason == "stop"
    kept = tiny.generate(
        "hello",
        SamplingParams(**{**GREEDY.__dict__, "stop": (stop,), "include_stop_str_in_output": True}),
    )[0]
    assert kept.text == stop and full.startswith(kept.text)


# --- against a live server on loopback --------------------------------------------------------


@pytest.fixture(scope="module")
def small_pool_server():
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from tesela.engine.llm_engine import LLMEngine, make_engine_config
    from tesela.server.app import ServerThread, create_app

    config, path = make_engine_config("tiny", num_kv_tokens=256)
    server = ServerThread(create_app(LLMEngine(config, path)))
    server.start(timeout=TIMEOUT)
    yield server
    server.stop()


def post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json=body, timeout=TIMEOUT)


def test_server_refuses_what_the_pool_can_never_hold(small_pool_server):
    """`--num-kv-tokens 256` and max_tokens 1000: a 400 naming the limit, not 252 tokens."""
    body = {"model": "tiny", "prompt": "abcd", "max_tokens": 1000, "ignore_eos": True}
    response = post(small_pool_server, body)
    assert response.status_code == 400, response.text
    assert "256" in response.json()["error"]["message"]
    fits = post(small_pool_server, {**body, "max_tokens": 252, "temperature": 0})
    assert fits.status_code == 200, fits.text
    choice = fits.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert fits.json()["usage"]["completion_tokens"] == 252


def test_server_cuts_a_stop_string_at_the_start(small_pool_server, tiny):
    full, stop = first_char_stop(tiny, "hello")
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 12, "temperature": 0}
    body.update(ignore_eos=True, stop=[stop])
    response = post(small_pool_server, body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["text"] == "" and choice["finish_reason"] == "stop"
    streamed, finish = "", None
    with httpx.stream(
        "POST",
        small_pool_server.url + "/v1/completions",
        json={**body, "stream": True},
        timeout=TIMEOUT,
    ) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    streamed += c["text"]
                    finish = c.get("finish_reason") or finish
    assert streamed == "" and finish == "stop"
