"""The server's pieces without HTTP: request validation, stream deltas, metrics text and the
async engine's admission (the end-to-end tests are in test_server.py)."""

from __future__ import annotations

import asyncio

import pytest

from tesela.engine.llm_engine import LLMEngine, RequestOutput, make_engine_config
from tesela.engine.sampling_params import SamplingParams
from tesela.server.async_engine import AsyncEngine, Overloaded
from tesela.server.metrics import Histogram, ServerMetrics
from tesela.server.protocol import APIError, ModelInfo, parse_chat, parse_completion
from tesela.server.serving import ChoiceStream
from tesela.tokenizer import ByteTokenizer

MODEL = ModelInfo(
    "tiny", ("tiny-alias",), max_model_len=64, vocab_size=258, tokenizer=ByteTokenizer()
)


def completion(**body) -> dict:
    return {"model": "tiny", "prompt": "hello", **body}


def test_completion_choices_prompts_and_seeds():
    request = parse_completion(completion(prompt=["ab", [1, 2, 3]], n=2, seed=7), MODEL)
    assert request.prompts == [[97, 98], [1, 2, 3]]
    assert request.choice_prompts == [0, 0, 1, 1]
    assert [p.seed for p in request.choice_params] == [7, 8, 7, 8]
    assert request.num_prompt_tokens == 5
    assert request.choice_params[0].max_tokens == 16  # the OpenAI default


def test_default_max_tokens_fits_the_context():
    long_prompt = "x" * 60
    assert parse_completion(completion(prompt=long_prompt), MODEL).choice_params[0].max_tokens == 4
    chat = parse_chat(
        {"model": "tiny-alias", "messages": [{"role": "user", "content": "hi"}]}, MODEL
    )
    # Chat has no default limit: whatever the context leaves.
    assert chat.choice_params[0].max_tokens == 64 - len(chat.prompts[0])
    assert chat.model == "tiny"


def test_errors_name_the_field_and_what_to_do():
    with pytest.raises(APIError, match="ask for at most 59 tokens") as info:
        parse_completion(completion(max_tokens=100), MODEL)
    assert info.value.param == "max_tokens" and info.value.code == "context_length_exceeded"
    with pytest.raises(APIError, match="'temperature' must be a number, got string"):
        parse_completion(completion(temperature="0.5"), MODEL)
    with pytest.raises(APIError, match="serves 'tiny'") as info:
        parse_completion(completion(model="llama"), MODEL)
    assert info.value.status == 404
    with pytest.raises(APIError, match="text parts"):
        parse_chat(
            {
                "model": "tiny",
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ],
            },
            MODEL,
        )


def test_chat_text_parts_and_logprobs():
    body = {
        "model": "tiny",
        "logprobs": True,
        "top_logprobs": 3,
        "max_completion_tokens": 5,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ],
    }
    request = parse_chat(body, MODEL)
    assert ByteTokenizer().decode(request.prompts[0]) == "user: ab\nassistant:"
    assert request.logprobs == 3 and request.choice_params[0].logprobs == 3
    assert request.choice_params[0].max_tokens == 5


def output(token_ids: list[int], text: str, finished: bool = False) -> RequestOutput:
    return RequestOutput(
        "r", [1], token_ids, text, finished=finished, finish_reason="stop" if finished else None
    )


def test_stream_holds_back_incomplete_utf8():
    tokenizer, stream = ByteTokenizer(), ChoiceStream(holdback=0)
    word = list("né!".encode())  # é is two bytes
    deltas = []
    for i in range(1, len(word) + 1):
        delta, _, changed = stream.advance(output(word[:i], tokenizer.decode(word[:i])))
        assert changed
        deltas.append(delta)
    assert deltas == ["n", "", "é", "!"]  # never a U+FFFD that later turns into é


def test_stream_holds_back_a_possible_stop_string():
    stream = ChoiceStream(holdback=len("STOP") - 1)
    assert stream.advance(output([1], "abcST"))[0] == "ab"
    assert stream.advance(output([1, 2], "abcSTO"))[0] == "c"  # "STO" may still become STOP
    delta, _, _ = stream.advance(output([1, 2, 3], "abc", finished=True))  # the engine cut it
    assert stream.text == "abc" and delta == ""


def test_histogram_renders_cumulative_buckets():
    histogram = Histogram("latency_seconds", "help", buckets=(0.1, 1.0))
    for value in (0.05, 0.5, 5.0):
        histogram.observe(value)
    lines = histogram.render()
    assert 'tesela_latency_seconds_bucket{le="0.1"} 1' in lines
    assert 'tesela_latency_seconds_bucket{le="1"} 2' in lines
    assert 'tesela_latency_seconds_bucket{le="+Inf"} 3' in lines
    assert "tesela_latency_seconds_count 3" in lines


def test_metrics_text_has_engine_numbers():
    stats = {
        "num_running": 2,
        "kv_blocks_used": 3,
        "kv_blocks_total": 12,
        "dispatch": {"paths": {"eager": 5}, "fallbacks": {"too many tokens": 5}},
    }
    text = ServerMetrics("org/model").render(stats)
    assert 'tesela_num_requests_running{model_name="org/model"} 2' in text
    assert 'tesela_kv_cache_usage_ratio{model_name="org/model"} 0.25' in text
    assert 'tesela_graph_fallback_total{model_name="org/model",reason="too many tokens"} 5' in text
    assert 'tesela_time_to_first_token_seconds_bucket{model_name="org/model",le="+Inf"} 0' in text


@pytest.fixture(scope="module")
def tiny_engine():
    config, path = make_engine_config("tiny", max_num_seqs=1, num_kv_tokens=256)
    return LLMEngine(config, path)


def test_admission_is_bounded_and_all_or_none(tiny_engine):
    async def scenario():
        engine = AsyncEngine(tiny_engine, max_queue_len=1)  # 1 running + 1 queued
        engine.start()
        try:
            params = SamplingParams(max_tokens=3, temperature=0)
            # The second prompt cannot fit (max_model_len is lowered to the KV pool at startup).
            with pytest.raises(ValueError, match="KV cache|max_model_len"):
                await engine.submit([[1, 2], [3] * 300], [params, params])
            assert engine.stats()["num_pending"] == 0  # the first one was taken back
            with pytest.raises(ValueError, match="lower n"):  # can never fit: a 400, not a 503
                await engine.submit([[1]] * 3, [params] * 3)
            long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
            busy = await engine.submit([[1], [2]], [long, long])
            with pytest.raises(Overloaded, match="--max-queue-len"):
                await engine.submit([[3]], [params])
            busy.abort()
            for _ in range(200):  # the engine thread applies the abort between steps
                if engine.stats()["num_pending"] == 0:
                    break
                await asyncio.sleep(0.01)
            group = await engine.submit([[1], [2]], [params, params])
            finals = {}
            async for latest in group.outputs():
                finals.update(latest)
            assert [len(finals[i].token_ids) for i in (0, 1)] == [3, 3]
        finally:
            engine.shutdown()
        assert engine.stats()["num_pending"] == 0

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_chat_uses_the_tokenizer_chat_template(tmp_path):
    from conftest import write_tokenizer

    from tesela.tokenizer import HFTokenizer

    template = (
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}"
        "{% endif %}t{{ loop.index }} {% endfor %}{% if add_generation_prompt %}t9{% endif %}"
    )
    write_tokenizer(tmp_path, vocab_size=32, eos_id=2, chat_template=template)
    model = ModelInfo("hf", (), max_model_len=64, vocab_size=32, tokenizer=HFTokenizer(tmp_path))
    messages = [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]
    assert parse_chat({"model": "hf", "messages": messages}, model).prompts == [[1, 2, 9]]
    with pytest.raises(APIError, match="no tools") as info:
        parse_chat({"model": "hf", "messages": [{"role": "tool", "content": "x"}]}, model)
    assert info.value.status == 400 and info.value.param == "messages"
