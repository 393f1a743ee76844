"""The OpenAI-compatible server, end to end: a real uvicorn server on loopback with the tiny
model, driven by the official `openai` client (streaming and not) and by raw httpx for the
malformed requests. Every test is bounded by timeouts."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from tesela import LLM, SamplingParams  # noqa: E402
from tesela.engine.llm_engine import LLMEngine, make_engine_config  # noqa: E402
from tesela.engine_args import EngineArgs  # noqa: E402
from tesela.server.app import ServerThread, create_app, create_process_app  # noqa: E402

TIMEOUT = 30.0


def start_server(max_queue_len: int = 1024, in_process: bool = False, **engine_kwargs):
    """A server on loopback; its engine in an engine-core process (as `tesela serve`), or on a
    thread of this process with `in_process` (`--engine-in-process`). The engine process gets
    one intra-op thread: on a small shared CPU, torch's barrier waits across busy cores make
    each tiny step several times slower (the engine thread of the in-process mode runs one)."""
    # Overlap scheduling on, as on CUDA by default: every test below also checks that outputs,
    # aborts, preemption and fault recovery hold when each step is read back one step later
    # (the `offline` reference runs without overlap).
    engine_kwargs.setdefault("overlap_schedule", True)
    if in_process:
        config, path = make_engine_config("tiny", **engine_kwargs)
        app = create_app(LLMEngine(config, path), max_queue_len=max_queue_len)
    else:
        engine_args = EngineArgs.from_kwargs("tiny", **engine_kwargs)
        app = create_process_app(engine_args, max_queue_len=max_queue_len, torch_threads=1)
    server = ServerThread(app)
    server.start(timeout=TIMEOUT)
    return server, app


@pytest.fixture(scope="module")
def server():
    server, app = start_server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small_server():
    """Two running + two queued requests at most, and a KV pool of 512 tokens."""
    server, app = start_server(max_queue_len=2, max_num_seqs=2, num_kv_tokens=512)
    server.app_state = app.state.server
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small_server_in_process():
    """small_server's engine on a thread of this process, where a test can reach it."""
    server, app = start_server(in_process=True, max_queue_len=2, max_num_seqs=2)
    server.app_state = app.state.server
    yield server
    server.stop()


@pytest.fixture(scope="module")
def offline():
    return LLM("tiny")


def client(server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT
    )


def stats(server) -> dict:
    return httpx.get(server.url + "/stats", timeout=TIMEOUT).json()


def wait_idle(server, timeout: float = 10.0) -> dict:
    """Poll /stats until no request holds KV blocks (or fail with the last stats)."""
    deadline = time.monotonic() + timeout
    while True:
        current = stats(server)
        if current["kv_blocks_used"] == 0 and current["num_pending"] == 0:
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"KV blocks still held after {timeout} s: {current}")
        time.sleep(0.05)


def metric(server, line_prefix: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    for line in text.splitlines():
        # Every sample carries the model_name label; match on the other labels.
        line = line.replace('{model_name="tiny"}', "").replace('model_name="tiny",', "")
        if line.startswith(line_prefix + " "):
            return float(line.split()[-1])
    return 0.0


# ---- the happy paths ------------------------------------------------------------------------


def test_models_health_and_metrics(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
    client(server).completions.create(model="tiny", prompt="metrics", max_tokens=4)
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    for name in (
        "tesela_http_requests_total",
        "tesela_time_to_first_token_seconds_count",
        "tesela_time_per_output_token_seconds_bucket",
        "tesela_num_requests_waiting",
        'tesela_graph_path_total{model_name="tiny",path="eager"}',
        'tesela_graph_fallback_total{model_name="tiny",reason="graphs_disabled"}',
        'tesela_generation_tokens_total{model_name="tiny"}',
    ):
        assert name in text, name
    assert metric(server, "tesela_time_to_first_token_seconds_count") >= 1
    assert metric(server, "tesela_generation_tokens_total") >= 4


def test_greedy_completion_matches_offline(server, offline):
    prompt = "The capital of France is"
    expected = offline.generate(prompt, SamplingParams(max_tokens=24, temperature=0))[0]
    api = client(server)
    response = api.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert response.choices[0].text == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.token_ids)
    stream = api.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_token_id_prompt_matches_offline(server, offline):
    tokens = [72, 101, 108, 108, 111]
    expected = offline.generate(tokens, SamplingParams(max_tokens=10, temperature=0))[0]
    response = client(server).completions.create(
        model="tiny", prompt=tokens, max_tokens=10, temperature=0
    )
    assert response.choices[0].text == expected.text


def test_chat_greedy_matches_offline_streaming_and_not(server, offline):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = offline.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    expected = offline.generate(prompt, SamplingParams(max_tokens=16, temperature=0))[0]
    api = client(server)
    response = api.chat.completions.create(
        model="tiny", messages=messages, max_tokens=16, temperature=0
    )
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.text
    assert response.usage.completion_tokens == len(expected.token_ids)
    chunks = list(
        api.chat.completions.create(
            model="tiny", messages=messages, max_tokens=16, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_n_and_seed_are_reproducible(server):
    api = client(server)
    kwargs = dict(
        model="tiny",
        prompt="seeded",
        max_tokens=12,
        temperature=1.0,
        top_p=0.9,
        n=3,
        seed=1234,
        extra_body={"top_k": 50, "ignore_eos": True},
    )
    first = api.completions.create(**kwargs)
    second = api.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1  # n choices, not n copies
    assert first.usage.completion_tokens == 3 * 12
    streamed: dict[int, str] = {}
    for chunk in api.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(3)] == [c.text for c in first.choices]


def test_stop_strings_cut_the_text(server):
    api = client(server)
    base = dict(
        model="tiny",
        prompt="stop here",
        max_tokens=40,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    full = api.completions.create(**base).choices[0].text
    stop = full[10:12]
    expected = full[: full.find(stop)]
    response = api.completions.create(stop=[stop], **base)
    assert response.choices[0].text == expected
    assert response.choices[0].finish_reason == "stop"
    stream = api.completions.create(stop=stop, stream=True, **base)
    assert "".join(c.choices[0].text for c in stream) == expected


def test_logprobs_in_both_formats(server):
    api = client(server)
    response = api.completions.create(
        model="tiny", prompt="logprobs", max_tokens=6, temperature=0, logprobs=3
    )
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == 6
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy takes the best
    chat = api.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    assert all(len(item.top_logprobs) == 2 and item.logprob <= 0 for item in content)
    streamed = []
    for chunk in api.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    ):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in content])


# ---- bad input ------------------------------------------------------------------------------

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]

BAD_REQUESTS = [
    # (route, body (dict, or raw text), status, param the error must name)
    (COMPLETIONS, '{"model": "tiny", "prompt": ', 400, None),
    (COMPLETIONS, "[1, 2, 3]", 400, None),
    (COMPLETIONS, '{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, None),
    (COMPLETIONS, {"model": "tiny"}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "x"}, 400, "model"),
    (COMPLETIONS, {"model": "tiny", "prompt": 42}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": ""}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": []}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": [1, 999999]}, 400, "prompt"),
    (COMPLETIONS, {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x" * 3000}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "top_k": -2}, 400, "top_k"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "n": True}, 400, "n"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "stream": "yes"}, 400, "stream"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "stop": [""]}, 400, "stop"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "stop": 3}, 400, "stop"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "seed": "abc"}, 400, "seed"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "echo": True, "stream": True}, 400, "echo"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "suffix": "y"}, 400, "suffix"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    (
        COMPLETIONS,
        {"model": "tiny", "prompt": "x", "frequency_penalty": "a"},
        400,
        "frequency_penalty",
    ),
    (
        COMPLETIONS,
        {"model": "tiny", "prompt": "x", "repetition_penalty": 0},
        400,
        "repetition_penalty",
    ),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "min_p": 1.5}, 400, "min_p"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "min_tokens": -1}, 400, "min_tokens"),
    (
        COMPLETIONS,
        {"model": "tiny", "prompt": "x", "min_tokens": 9, "max_tokens": 4},
        400,
        "min_tokens",
    ),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "logit_bias": [5]}, 400, "logit_bias"),
    # n x prompts over the per-request cap (max_num_seqs = 256 here)
    (COMPLETIONS, {"model": "tiny", "prompt": ["a", "b", "c"], "n": 100}, 400, "n"),
    # malformed beyond the schema: a lone surrogate, and JSON nested 100k deep
    (COMPLETIONS, '{"model": "tiny", "prompt": "a\\ud800b"}', 400, "prompt"),
    (
        CHAT,
        '{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}',
        400,
        "messages",
    ),
    (COMPLETIONS, "[" * 100_000 + "]" * 100_000, 400, None),
    (COMPLETIONS, '{"model": "tiny", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, None),
    (CHAT, {"model": "tiny"}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": []}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": "hi"}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": ["hi"]}, 400, "messages[0]"),
    (
        CHAT,
        {"model": "tiny", "messages": [{"role": "king", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    (
        CHAT,
        {"model": "tiny", "messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content",
    ),
    (
        CHAT,
        {"model": "tiny", "messages": [{"role": "user", "content": "x" * 3000}]},
        400,
        "messages",
    ),
    (CHAT, {"model": "other", "messages": MESSAGES}, 404, "model"),
    (CHAT, {"model": "tiny", "messages": MESSAGES, "max_tokens": -3}, 400, "max_tokens"),
    (
        CHAT,
        {"model": "tiny", "messages": MESSAGES, "max_completion_tokens": 10**9},
        400,
        "max_completion_tokens",
    ),
    (CHAT, {"model": "tiny", "messages": MESSAGES, "temperature": -1}, 400, "temperature"),
    (CHAT, {"model": "tiny", "messages": MESSAGES, "top_p": 2}, 400, "top_p"),
    (CHAT, {"model": "tiny", "messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"model": "tiny", "messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "tools"),
]


@pytest.mark.parametrize("route,body,status,param", BAD_REQUESTS)
def test_bad_input_gets_an_openai_error(server, route, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(
        server.url + route,
        content=content,
        timeout=TIMEOUT,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert len(error["message"]) > 20  # says what was wrong, not just "bad request"


def test_wrong_routes_and_methods_are_json_errors(server):
    missing = httpx.get(server.url + "/v1/nothing", timeout=TIMEOUT)
    assert missing.status_code == 404 and "error" in missing.json()
    wrong_method = httpx.get(server.url + COMPLETIONS, timeout=TIMEOUT)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_bad_requests_do_not_disturb_requests_in_flight(server):
    api = client(server)
    stream = api.completions.create(
        model="tiny",
        prompt="long one",
        max_tokens=300,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    next(chunks)  # generation is under way
    for route, body, status, _ in BAD_REQUESTS[:12]:
        content = body if isinstance(body, str) else json.dumps(body)
        assert (
            httpx.post(server.url + route, content=content, timeout=TIMEOUT).status_code == status
        )
    rest = list(chunks)
    assert rest[-1].usage.completion_tokens == 300
    assert api.completions.create(model="tiny", prompt="after", max_tokens=3).usage
    wait_idle(server)


# ---- load, disconnects, overload and faults -------------------------------------------------


def test_64_concurrent_streams_complete_with_their_token_counts(server):
    async def one(api, i: int) -> tuple[int, int, int, str]:
        max_tokens = 4 + i % 13
        stream = await api.completions.create(
            model="tiny",
            prompt=f"request {i}",
            max_tokens=max_tokens,
            temperature=0.8,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks, reason, usage = 0, None, None
        async for chunk in stream:
            if chunk.choices:
                chunks += 1
                reason = chunk.choices[0].finish_reason or reason
            usage = chunk.usage or usage
        return max_tokens, usage.completion_tokens, chunks, reason

    async def run_all():
        api = openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT
        )
        async with api:
            return await asyncio.wait_for(asyncio.gather(*(one(api, i) for i in range(64))), 60)

    results = asyncio.run(run_all())
    assert len(results) == 64
    for max_tokens, completion_tokens, chunks, reason in results:
        assert completion_tokens == max_tokens
        assert 1 <= chunks <= max_tokens
        assert reason == "length"
    wait_idle(server)


def engine_steps(server) -> int:
    return sum(stats(server)["dispatch"]["paths"].values())


def test_clients_that_disconnect_leave_no_kv_blocks(server):
    aborted_before = metric(server, 'tesela_request_success_total{finish_reason="abort"}')
    wait_idle(server)
    steps_before = engine_steps(server)
    body = {
        "model": "tiny",
        "prompt": "disconnect me",
        "max_tokens": 2000,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=TIMEOUT) as http:
        for _ in range(3):
            with http.stream("POST", server.url + COMPLETIONS, json=body) as response:
                lines = response.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))
                assert stats(server)["kv_blocks_used"] > 0
    # A non-streaming client that gives up (read timeout) also cancels its request.
    body.pop("stream")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + COMPLETIONS, json=body, timeout=httpx.Timeout(5, read=0.3))
    wait_idle(server)
    aborted = metric(server, 'tesela_request_success_total{finish_reason="abort"}')
    assert aborted - aborted_before == 4
    # The engine itself stopped them: none ran on towards its 2000 tokens once its client left.
    assert engine_steps(server) - steps_before < 1000


def test_overload_answers_503_and_keeps_accepted_requests(small_server):
    async def one(http: httpx.AsyncClient, i: int):
        body = {"model": "tiny", "prompt": f"load {i}", "max_tokens": 150, "ignore_eos": True}
        response = await http.post(small_server.url + COMPLETIONS, json=body)
        return response.status_code, response.json(), response.headers

    async def run_all():
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            return await asyncio.wait_for(asyncio.gather(*(one(http, i) for i in range(10))), 60)

    results = asyncio.run(run_all())
    accepted = [body for status, body, _ in results if status == 200]
    rejected = [(body, headers) for status, body, headers in results if status == 503]
    assert len(accepted) + len(rejected) == 10
    assert len(accepted) >= 4 and rejected  # limit: 2 running + 2 queued
    assert all(body["usage"]["completion_tokens"] == 150 for body in accepted)
    assert all(b["error"]["code"] == "overloaded" and h["retry-after"] for b, h in rejected)
    wait_idle(small_server)
    assert client(small_server).completions.create(model="tiny", prompt="ok", max_tokens=2)


def test_kv_exhaustion_preempts_and_resumes(small_server):
    before = stats(small_server)["num_preemptions"]
    api = client(small_server)

    async def one(api, i: int):
        response = await api.completions.create(
            model="tiny", prompt=f"kv {i}", max_tokens=300, extra_body={"ignore_eos": True}
        )
        return response.usage.completion_tokens

    async def run_all():
        api = openai.AsyncOpenAI(
            base_url=small_server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT
        )
        async with api:
            return await asyncio.wait_for(asyncio.gather(*(one(api, i) for i in range(3))), 60)

    assert asyncio.run(run_all()) == [300, 300, 300]  # 2 x 306 tokens do not fit 512
    assert stats(small_server)["num_preemptions"] > before
    wait_idle(small_server)
    # A prompt the KV pool can never hold is the client's error: max_model_len was lowered to
    # the 512-token pool at startup, so the request is refused with that limit.
    too_big = httpx.post(
        small_server.url + COMPLETIONS,
        timeout=TIMEOUT,
        json={"model": "tiny", "prompt": "y" * 600, "max_tokens": 1},
    )
    assert too_big.status_code == 400 and "512" in too_big.json()["error"]["message"]
    assert api.completions.create(model="tiny", prompt="ok", max_tokens=2).usage


def test_an_engine_fault_fails_its_requests_and_the_server_recovers(
    small_server_in_process, caplog
):
    small_server = small_server_in_process
    engine = small_server.app_state.engine.engine
    original = engine.step
    calls = {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault")
        return original()

    engine.step = failing_step
    try:
        api = client(small_server)
        stream = api.completions.create(
            model="tiny",
            prompt="fault",
            max_tokens=50,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        with pytest.raises(openai.APIError, match="the engine failed") as raised:
            for _ in stream:
                pass
    finally:
        engine.step = original
    # The client sees no internal text; the log has the traceback under the request's id.
    assert "injected fault" not in str(raised.value)
    request_id = stream.response.headers["x-request-id"]
    logged = [r for r in caplog.records if r.exc_info and "injected fault" in str(r.exc_info[1])]
    assert len(logged) == 1 and request_id in logged[0].getMessage()
    wait_idle(small_server)
    response = api.completions.create(
        model="tiny", prompt="fine", max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert response.usage.completion_tokens == 5
    assert httpx.get(small_server.url + "/health", timeout=TIMEOUT).status_code == 200
    assert metric(small_server, "tesela_engine_errors_total") == 1


def test_bench_serve_against_a_running_server(server, tmp_path, capsys):
    import argparse

    from tesela.bench.serve import add_bench_serve_arguments, run_bench_serve

    parser = argparse.ArgumentParser()
    add_bench_serve_arguments(parser)
    args = parser.parse_args(
        [
            "--url",
            server.url,
            "--num-prompts",
            "8",
            "--concurrency",
            "1,4",
            "--input-len",
            "8,16",
            "--output-len",
            "4,8",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert run_bench_serve(args) == 0
    results = json.loads(next(tmp_path.glob("serve-*.json")).read_text())
    assert [r["concurrency"] for r in results["runs"]] == [1, 4]
    for run in results["runs"]:
        assert run["completed"] == 8 and run["failed"] == 0
        assert run["output_throughput"] > 0 and run["ttft_ms"]["p50"] > 0
    table = capsys.readouterr().out.splitlines()[-4:]  # the table is printed last
    assert table[0].startswith("| concurrency") and table[-1].startswith("| 4 |")
