"""The engine end to end on CPU: batching, preemption, stop conditions, sampling, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from tesela import LLM, SamplingParams
from tesela.tokenizer import ByteTokenizer, HFTokenizer

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = ["a", "hello there", "the quick brown fox jumps", "x" * 40, "tesela!", "0123456789"]


@pytest.fixture(scope="module")
def tiny():
    return LLM("tiny")


def test_batched_requests_get_the_tokens_they_get_alone(tiny):
    together = tiny.generate(PROMPTS, GREEDY)
    for prompt, output in zip(PROMPTS, together, strict=True):
        assert output.token_ids == tiny.generate(prompt, GREEDY)[0].token_ids
        assert len(output.token_ids) == 12 and output.finish_reason == "length"


def test_a_pool_too_small_preempts_and_every_request_completes(tiny):
    reference = [o.token_ids for o in tiny.generate(PROMPTS * 3, GREEDY)]
    # 8 blocks of 4 tokens: not enough for all requests at once, enough for each alone.
    small = LLM("tiny", num_kv_tokens=56, block_size=4, max_num_batched_tokens=64)
    outputs = small.generate(PROMPTS * 3, GREEDY)
    assert [o.token_ids for o in outputs] == reference
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.block_manager.num_used_blocks == 0


def test_chunked_prefill_under_a_small_token_budget_matches(tiny):
    reference = [o.token_ids for o in tiny.generate(PROMPTS, GREEDY)]
    chunked = LLM("tiny", max_num_batched_tokens=7)
    assert [o.token_ids for o in chunked.generate(PROMPTS, GREEDY)] == reference


def test_stop_conditions(tiny):
    first = tiny.generate("hello", GREEDY)[0]
    eos = first.token_ids[3]
    stopped = tiny.generate(
        "hello", SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(eos,))
    )[0]
    assert stopped.token_ids == first.token_ids[: first.token_ids.index(eos) + 1]
    assert stopped.finish_reason == "stop"
    text = ByteTokenizer().decode(first.token_ids)
    stop = text[4:6]
    if stop and len(stop.encode()) == 2:
        by_string = tiny.generate("hello", SamplingParams(max_tokens=12, temperature=0, stop=stop))
        assert by_string[0].finish_reason == "stop" and stop not in by_string[0].text


def test_eos_stops_unless_ignored():
    llm = LLM("tiny")
    tokenizer = llm.tokenizer
    first = llm.generate("hi", GREEDY)[0].token_ids
    llm.engine.eos_token_ids = (first[2],)  # make a token we know comes up the EOS
    out = llm.generate("hi", SamplingParams(max_tokens=12, temperature=0))[0]
    assert out.token_ids == first[:3] and out.finish_reason == "stop"
    assert tokenizer.eos_token_ids == (ByteTokenizer.EOS,)


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=1234)
    alone = tiny.generate("seeded", params)[0].token_ids
    batched = tiny.generate(["other", "seeded", "more"], [GREEDY, params, GREEDY])[1].token_ids
    assert alone == batched
    different = tiny.generate("seeded", SamplingParams(max_tokens=10, temperature=1.0, seed=99))
    assert different[0].token_ids != alone


def test_top_k_1_is_greedy_and_logprobs_are_normalized(tiny):
    greedy = tiny.generate("abc", GREEDY)[0]
    top1 = tiny.generate(
        "abc",
        SamplingParams(
            max_tokens=12, temperature=2.0, top_k=1, ignore_eos=True, seed=3, logprobs=5
        ),
    )[0]
    assert top1.token_ids == greedy.token_ids
    for lp in top1.logprobs:
        assert lp.token_id == next(iter(lp.top))  # greedy picks the most likely token
        assert len(lp.top) == 5 and lp.logprob <= 0
        assert list(lp.top.values()) == sorted(lp.top.values(), reverse=True)


def test_top_p_keeps_only_the_nucleus():
    from tesela.executor.sampling import SamplingTensors, filter_logits

    def kept(top_p: float, top_k: int = -1) -> list[bool]:
        logits = torch.log(torch.tensor([[0.15, 0.5, 0.05, 0.3]]))
        params = SamplingParams(temperature=1.0, top_p=top_p, top_k=top_k)
        tensors = SamplingTensors.build([params], [0], [0], 4, "cpu")
        return torch.isfinite(filter_logits(logits, tensors))[0].tolist()

    assert kept(0.7) == [False, True, False, True]
    assert kept(0.01) == [False, True, False, False]
    assert kept(1.0) == [True] * 4
    assert kept(1.0, top_k=3) == [True, True, False, True]


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(logprobs=50), "logprobs"),
    ],
)
def test_bad_sampling_params_raise_clear_errors(params, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**params)


def test_bad_prompts_raise_and_leave_no_work_behind(tiny):
    with pytest.raises(ValueError, match="empty"):
        tiny.generate("", GREEDY)
    with pytest.raises(ValueError, match="empty"):
        tiny.generate(["fine", ""], GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        tiny.generate("y" * 5000, GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        tiny.generate([[1, 2, 100000]], GREEDY)
    assert not tiny.engine.has_unfinished()
    assert tiny.generate("ok", GREEDY)[0].finish_reason == "length"


def test_unknown_model_and_architecture(tmp_path):
    with pytest.raises(ValueError, match="neither a folder nor a preset"):
        LLM("no-such-model")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        LLM(str(tmp_path))


def test_missing_shard_and_tensor(tmp_path, checkpoints):
    import shutil

    source, _ = checkpoints["llama"]
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    (broken / "model-00003-of-00009.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00003-of-00009.safetensors"):
        LLM(str(broken), dtype="float32")

    from safetensors.torch import load_file, save_file

    single = tmp_path / "single"
    shutil.copytree(checkpoints["qwen2"][0], single)
    tensors = load_file(single / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, single / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.self_attn.k_proj.weight"):
        LLM(str(single), dtype="float32")


def test_chat_template_from_tokenizer_config(tmp_path):
    from conftest import write_tokenizer

    template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    write_tokenizer(tmp_path, 32, eos_id=2, chat_template=template)
    tokenizer = HFTokenizer(tmp_path)
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages) == "<user>hi<assistant>"
    assert tokenizer.eos_token_ids == (2,)
    assert ByteTokenizer().apply_chat_template(messages) == "user: hi\nassistant:"


def test_step_outputs_show_each_step_without_copying_the_output(tiny):
    """A running request's output of each step shows the tokens and logprobs it had then
    (later steps do not change it) and equals those lists; building it, or slicing its new
    part, copies nothing more, so a long generation costs O(1) a step, not O(n); the finished
    output holds plain lists."""
    import tracemalloc

    engine = tiny.engine
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    engine.add_request([5, 6, 7], params, "r")
    seen = []
    while engine.has_unfinished():
        seen += [o for o in engine.step() if o.request_id == "r"]
    final = seen[-1]
    assert final.finished and type(final.token_ids) is list and type(final.logprobs) is list
    assert len(final.token_ids) == 6
    running = [o for o in seen if not o.finished and o.token_ids]
    assert running, "the request produced outputs before finishing"
    for output in running:
        n = len(output.token_ids)
        assert output.token_ids == final.token_ids[:n]
        assert output.token_ids[-1] == final.token_ids[n - 1]
        assert output.token_ids[1:] == final.token_ids[1:n]
        assert output.token_ids[-2:] == final.token_ids[max(n - 2, 0) : n]
        assert output.token_ids[::-1] == final.token_ids[:n][::-1]
        assert [lp.token_id for lp in output.logprobs] == final.token_ids[:n]
        with pytest.raises(IndexError):
            output.token_ids[n]

    request = _long_request()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    output = engine._output(request, 1)
    tail = output.logprobs[99_998:]  # what the engine core sends of it: the new part
    grown = tracemalloc.get_traced_memory()[1] - before  # the peak: temporaries count too
    tracemalloc.stop()
    assert len(output.token_ids) == 100_000 and len(tail) == 2
    assert grown < 20_000, f"building a step's output allocated {grown} bytes: a copy"


def test_the_offline_loop_builds_outputs_only_for_finished_requests(tiny):
    """`step(running_outputs=False)` (what `LLM.generate` runs) returns the finished requests'
    outputs only, equal to those of the streaming loop; the running rows' tokens are counted
    (`num_generated_tokens`, the progress bar's) without an output each."""
    engine = tiny.engine
    prompts = [[5, 6, 7], [8], [9, 10]]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (2, 5, 3)]

    def drive(**kwargs):
        for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
            engine.add_request(prompt, sp, f"{kwargs}-{i}")
        start, steps = engine.num_generated_tokens, []
        while engine.has_unfinished():
            steps.append(engine.step(**kwargs))
        return steps, engine.num_generated_tokens - start

    streamed, streamed_count = drive()
    offline, offline_count = drive(running_outputs=False)
    assert streamed_count == offline_count == 2 + 5 + 3
    assert any(not o.finished for step in streamed for o in step)
    assert all(o.finished for step in offline for o in step)
    finals = [[o for step in steps for o in step if o.finished] for steps in (streamed, offline)]
    assert [(o.token_ids, o.text, o.finish_reason) for o in finals[0]] == [
        (o.token_ids, o.text, o.finish_reason) for o in finals[1]
    ]
    assert len(finals[1]) == 3


def test_the_offline_loop_decodes_a_text_once_unless_it_has_stop_strings(tiny):
    """With `running_outputs=False` a request without stop strings is decoded once, as it
    finishes (no text is read before): one decode of all its tokens, the text the streaming loop
    builds token by token. A request with stop strings still extends its text every step, so it
    stops where the streaming loop does."""
    engine = tiny.engine

    class Counting:
        def __init__(self, inner):
            self.inner, self.calls = inner, []

        def decode(self, ids, skip_special_tokens=True):
            self.calls.append(len(ids))
            return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

        def __getattr__(self, name):  # encode, eos ids, skips: the tokenizer's own
            return getattr(self.inner, name)

    plain = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    streamed = {}
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(tiny.tokenizer.encode(prompt), plain, f"stream-{i}")
    while engine.has_unfinished():
        streamed |= {o.request_id[7:]: o.text for o in engine.step() if o.finished}
    text = streamed["0"]
    stop = next(text[k : k + 2] for k in range(4, len(text) - 2) if text[k : k + 2].isprintable())

    counting = Counting(engine.tokenizer)
    engine.tokenizer = counting
    try:
        for i, prompt in enumerate(PROMPTS[:3]):
            engine.add_request(tiny.tokenizer.encode(prompt), plain, f"offline-{i}")
        offline = {}
        while engine.has_unfinished():
            out = engine.step(running_outputs=False)
            offline |= {o.request_id[8:]: o.text for o in out}
        assert offline == streamed
        assert len(counting.calls) == 3  # one decode of each request's whole output

        counting.calls.clear()
        stopping = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,))
        engine.add_request(tiny.tokenizer.encode(PROMPTS[0]), stopping, "offline-stop")
        while engine.has_unfinished():
            (final,) = engine.step(running_outputs=False) or (None,)
        assert final.finish_reason == "stop" and final.text == text[: text.index(stop)]
        assert len(counting.calls) > 2  # decoded step by step, to find the stop string
    finally:
        engine.tokenizer = counting.inner


def _long_request():
    """A running request with 100,000 output tokens (built directly: no model run needed)."""
    from tesela.engine.request import Request

    request = Request("long", [1, 2, 3], SamplingParams(max_tokens=200_000, logprobs=1))
    request.output_token_ids = list(range(100_000))
    request.output_logprobs = [None] * 100_000
    return request


def test_a_request_gives_any_span_of_its_tokens_without_joining_them():
    from tesela.engine.request import Request

    request = Request("r", [1, 2, 3, 4], SamplingParams())
    request.output_token_ids = [5, 6, 7]
    every = request.all_token_ids
    for start in range(8):
        for end in range(start, 8):
            assert request.token_ids(start, end) == every[start:end], (start, end)


def test_an_unseeded_draw_does_not_depend_on_the_greedy_rows_beside_it():
    """Greedy rows take no seed, so an unseeded sampled request gets the same seed, and draws
    the same tokens, whether or not a greedy request shared its steps."""
    drawn = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = LLM("tiny").generate(["tesela"], drawn, use_tqdm=False)[0].token_ids
    beside = LLM("tiny").generate(["hello", "tesela"], [greedy, drawn], use_tqdm=False)
    assert beside[1].token_ids == alone
