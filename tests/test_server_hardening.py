"""The server under hostile or careless clients, on a live uvicorn server over loopback: body
limits, malformed input, internal errors, API keys, sandboxed chat templates, the endpoints and
sampling parameters the ecosystem expects, and generation_config.json defaults."""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")

from starlette.routing import Route  # noqa: E402

from tesela import LLM, SamplingParams  # noqa: E402
from tesela.engine.llm_engine import LLMEngine, make_engine_config  # noqa: E402
from tesela.server.app import ServerThread, create_app  # noqa: E402

TIMEOUT = 30.0
HOSTILE_TEMPLATE = "{{ cycler.__init__.__globals__.os.getpid() }}"


def start(**app_options):
    engine_options = app_options.pop("engine", {})
    config, path = make_engine_config("tiny", **engine_options)
    app = create_app(LLMEngine(config, path), **app_options)
    server = ServerThread(app)
    server.start(timeout=TIMEOUT)
    server.app = app
    return server


@pytest.fixture(scope="module")
def server():
    server = start(max_request_bytes=64 * 2**20)
    yield server
    server.stop()


def client(server, api_key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=TIMEOUT
    )


def post(server, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, timeout=TIMEOUT, **kwargs)


# ---- size limits and responsiveness ---------------------------------------------------------


def health_latencies_while(url: str, work) -> tuple[list[float], object]:
    """Poll /health until `work` (run on a thread) returns; (latencies, its result)."""
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("value", work()))
    worker.start()
    latencies = []
    while worker.is_alive() or not latencies:
        start_time = time.monotonic()
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        latencies.append(time.monotonic() - start_time)
    worker.join()
    return latencies, result["value"]


def test_health_answers_within_a_second_while_a_50_mb_request_is_in_flight(server):
    body = json.dumps({"model": "tiny", "prompt": "x" * 50_000_000, "max_tokens": 1})
    latencies, big = health_latencies_while(
        server.url, lambda: post(server, "/v1/completions", body)
    )
    assert max(latencies) < 1.0, latencies
    assert big.status_code == 400
    error = big.json()["error"]
    # Refused by its length in characters, before any tokenization.
    assert error["code"] == "context_length_exceeded" and "characters" in error["message"]


def test_templating_runs_off_the_event_loop():
    # A legitimate but slow template (~150M loop steps, seconds on any CPU, so the checks below
    # run while it renders; 30M took under a second here): /health must not wait for it.
    slow = (
        "{% for i in range(100000) %}{% for j in range(1500) %}{% if j > 10000 %}x{% endif %}"
        "{% endfor %}{% endfor %}hi"
    )
    server = start(chat_template=slow)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    try:
        started = time.monotonic()
        latencies, response = health_latencies_while(
            server.url, lambda: post(server, "/v1/chat/completions", body)
        )
        assert response.status_code == 200 and time.monotonic() - started > 1.0
        assert len(latencies) > 3 and max(latencies) < 1.0, latencies
    finally:
        server.stop()


def test_a_body_over_the_limit_gets_413_with_or_without_content_length():
    small = start(max_request_bytes=1000)
    try:
        body = json.dumps({"model": "tiny", "prompt": "x" * 5000})
        declared = post(small, "/v1/completions", body)
        assert declared.status_code == 413
        assert declared.json()["error"]["code"] == "request_too_large"

        def chunks():  # chunked transfer: no Content-Length to refuse early
            for i in range(0, len(body), 500):
                yield body[i : i + 500].encode()

        streamed = httpx.post(small.url + "/v1/completions", content=chunks(), timeout=TIMEOUT)
        assert streamed.status_code == 413
        assert "max-request-bytes" in streamed.json()["error"]["message"]
        ok = post(small, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        small.stop()


# ---- internal errors ------------------------------------------------------------------------


def test_a_500_carries_a_request_id_not_internals_and_keeps_the_connection(server, caplog):
    async def broken(request):
        raise RuntimeError("secret internal detail")

    # A route with a bug, on the real app with its real middleware stack.
    server.app.router.routes.append(Route("/broken", broken))
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        for _ in range(5):
            with caplog.at_level(logging.ERROR, logger="tesela.server"):
                connection.request("GET", "/broken")
                response = connection.getresponse()
                body = json.loads(response.read())
            assert response.status == 500
            request_id = response.getheader("x-request-id")
            assert request_id and request_id in body["error"]["message"]
            assert "secret" not in json.dumps(body) and "RuntimeError" not in json.dumps(body)
            # The same keep-alive connection keeps working after the 500.
            connection.request("GET", "/health")
            health = connection.getresponse()
            assert health.status == 200 and json.loads(health.read()) == {"status": "ok"}
    finally:
        connection.close()
        server.app.router.routes.pop()
    logged = [r for r in caplog.records if "secret internal detail" in str(r.exc_info)]
    assert len(logged) == 5  # once per request, not twice
    assert all(r.getMessage().startswith("request ") for r in logged)


# ---- API key --------------------------------------------------------------------------------


def test_api_key_guards_the_v1_routes_only():
    guarded = start(api_key="sesame")
    try:
        with pytest.raises(openai.AuthenticationError):
            client(guarded, "wrong").models.list()
        assert httpx.get(guarded.url + "/v1/models", timeout=TIMEOUT).status_code == 401
        assert post(guarded, "/tokenize", {"prompt": "x"}).status_code == 401
        models = client(guarded, "sesame").models.list()
        assert [m.id for m in models.data] == ["tiny"]
        assert httpx.get(guarded.url + "/health", timeout=TIMEOUT).status_code == 200
    finally:
        guarded.stop()


# ---- chat templates -------------------------------------------------------------------------


def test_a_hostile_chat_template_fails_safely():
    hostile = start(chat_template=HOSTILE_TEMPLATE)
    try:
        response = post(
            hostile,
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "messages" and "unsafe" in error["message"]
        # The server goes on serving completions.
        assert client(hostile).completions.create(model="tiny", prompt="x", max_tokens=2).usage
    finally:
        hostile.stop()


def test_chat_template_flag_renders_with_the_transformers_helpers():
    template = (
        "{% for m in messages %}[{{ m.role }}]{{ m.content | tojson }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    custom = start(chat_template=template)
    try:
        messages = [{"role": "user", "content": "hi"}]
        tokens = post(custom, "/tokenize", {"messages": messages}).json()["tokens"]
        assert bytes(tokens).decode() == '[user]"hi"[assistant]'
    finally:
        custom.stop()


# ---- endpoints ------------------------------------------------------------------------------


def test_tokenize_detokenize_version_and_model_card(server):
    tokenized = post(server, "/tokenize", {"model": "tiny", "prompt": "héllo"}).json()
    assert tokenized["tokens"] == list("héllo".encode())
    assert tokenized["count"] == 6 and tokenized["max_model_len"] == 2048
    detokenized = post(server, "/detokenize", {"tokens": tokenized["tokens"]}).json()
    assert detokenized == {"prompt": "héllo"}
    bad = post(server, "/detokenize", {"tokens": [1, 99999]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    from tesela import __version__

    assert httpx.get(server.url + "/version").json() == {"version": __version__}
    card = client(server).models.retrieve("tiny")
    assert card.id == "tiny" and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("gpt-4")


def test_tokenizer_flag_loads_another_tokenizer(tmp_path):
    from conftest import write_tokenizer

    write_tokenizer(tmp_path, vocab_size=258, eos_id=2)
    other = start(engine={"tokenizer": str(tmp_path)})
    try:
        assert post(other, "/tokenize", {"prompt": "t5 t7 t257"}).json()["tokens"] == [5, 7, 257]
        assert post(other, "/detokenize", {"tokens": [5, 7]}).json() == {"prompt": "t5 t7"}
    finally:
        other.stop()


def test_served_model_name_is_the_id_clients_use():
    named = start(served_model_name="my-model")
    try:
        api = client(named)
        assert [m.id for m in api.models.list().data] == ["my-model"]
        response = api.completions.create(model="my-model", prompt="x", max_tokens=2)
        assert response.model == "my-model"
        metrics = httpx.get(named.url + "/metrics", timeout=TIMEOUT).text
        assert 'tesela_generation_tokens_total{model_name="my-model"} 2' in metrics
    finally:
        named.stop()


# ---- sampling parameters --------------------------------------------------------------------


@pytest.fixture(scope="module")
def offline():
    return LLM("tiny")


def greedy(api, **extra):
    response = api.completions.create(
        model="tiny",
        prompt="penalties",
        max_tokens=24,
        temperature=0,
        **{k: v for k, v in extra.items() if k in ("presence_penalty", "frequency_penalty")},
        extra_body={
            "ignore_eos": True,
            **{
                k: v for k, v in extra.items() if k not in ("presence_penalty", "frequency_penalty")
            },
        },
    )
    return response.choices[0].text


@pytest.mark.parametrize(
    "name,value",
    [
        ("presence_penalty", 2.0),
        ("frequency_penalty", 2.0),
        ("repetition_penalty", 3.0),
    ],
)
def test_penalties_change_greedy_output_as_the_offline_engine_does(server, offline, name, value):
    api = client(server)
    plain = greedy(api)
    penalized = greedy(api, **{name: value})
    assert penalized != plain
    expected = offline.generate(
        "penalties", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, **{name: value})
    )[0]
    assert penalized == expected.text


def test_logit_bias_min_tokens_and_min_p(server):
    api = client(server)
    forced = api.completions.create(
        model="tiny", prompt="x", max_tokens=6, temperature=1.0, logit_bias={"65": 100}
    )
    assert forced.choices[0].text == "AAAAAA"
    eos = "257"  # the byte tokenizer's EOS, made certain by the bias
    early = api.completions.create(model="tiny", prompt="x", max_tokens=8, logit_bias={eos: 100})
    assert early.usage.completion_tokens == 1 and early.choices[0].finish_reason == "stop"
    held = api.completions.create(
        model="tiny", prompt="x", max_tokens=8, logit_bias={eos: 100}, extra_body={"min_tokens": 5}
    )
    assert held.usage.completion_tokens == 6 and held.choices[0].finish_reason == "stop"
    # min_p=1 keeps only the most likely token: sampling becomes greedy.
    sampled = api.completions.create(
        model="tiny",
        prompt="x",
        max_tokens=12,
        temperature=1.0,
        seed=3,
        extra_body={"min_p": 1.0, "ignore_eos": True},
    )
    assert sampled.choices[0].text == greedy_text(api, "x", 12)


def greedy_text(api, prompt: str, max_tokens: int) -> str:
    response = api.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    return response.choices[0].text


def test_generation_config_gives_the_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "temperature": 0.7, "max_new_tokens": 7})
    )
    configured = start(engine={"generation_config": str(tmp_path)})
    try:
        api = client(configured)
        first = api.completions.create(
            model="tiny", prompt="defaults", extra_body={"ignore_eos": True}
        )
        second = api.completions.create(
            model="tiny", prompt="defaults", extra_body={"ignore_eos": True}
        )
        assert first.usage.completion_tokens == 7  # max_new_tokens, not OpenAI's 16
        assert first.choices[0].text == second.choices[0].text == greedy_text(api, "defaults", 7)
    finally:
        configured.stop()


def test_echo_with_prompt_logprobs_matches_the_offline_engine(server, offline):
    prompt = "loglikelihood"
    expected = offline.generate(
        prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1, logprobs=1)
    )[0]
    response = client(server).completions.create(
        model="tiny", prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1
    )
    choice = response.choices[0]
    assert choice.text == prompt + expected.text
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(prompt) + 1  # byte tokenizer: one token per character
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    want = [e.logprob for e in expected.prompt_logprobs[1:]] + [expected.logprobs[0].logprob]
    assert logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-5)
    assert logprobs.text_offset[:3] == [0, 1, 2]
    plain = client(server).completions.create(
        model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True
    )
    assert plain.choices[0].text.startswith(prompt) and plain.choices[0].logprobs is None
