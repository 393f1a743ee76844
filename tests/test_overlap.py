"""Overlap scheduling on CPU: step N+1 is launched before step N's tokens are read, and the
tokens, stops, KV blocks and seeded draws are exactly those of the engine without overlap.

The graph engine runs the real Triton backend in Triton's interpreter (CI exports
TRITON_INTERPRET=1) and FULL decode graphs with sampling inside, captured and replayed with the
CPU stand-in graphs, so with overlap on a decode row's input id is gathered from the token
tensor that the previous step's sampling graph wrote. (Piecewise graphs run the same forward
for extend batches; they are left out here to keep the interpreter's time down.)
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from tesela import LLM, SamplingParams
from tesela.engine.block_manager import hash_block
from tesela.engine.llm_engine import LLMEngine, make_engine_config
from tesela.tokenizer import ByteTokenizer

PROMPTS = ["hello there", "a", "the quick brown fox jumps over", "tesela!"]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=8, temperature=1.0, top_k=40, top_p=0.9, seed=5, ignore_eos=True)


def make_engine(overlap: bool, graphs: bool = False, **kwargs) -> LLMEngine:
    kwargs.setdefault("max_num_batched_tokens", 16)  # prompts arrive in chunks: mixed batches
    kwargs.setdefault("num_kv_tokens", 2048)
    config, path = make_engine_config("tiny", overlap_schedule=overlap, **kwargs)
    if graphs:
        config = dataclasses.replace(config, attention_backend="triton")
    engine = LLMEngine(config, path)
    if graphs:
        engine.runner.add_full_decode((1, 4), max_model_len=256)
        # Extend and mixed batches (<= 16 tokens here) replay a FULL mixed graph, so a mixed
        # batch's in-flight decode ids are fed into its static buffers too.
        engine.runner.add_full_mixed((16,), max_rows=4, max_model_len=256)
    return engine


def run(engine: LLMEngine, prompts, params, abort_at: dict[int, str] | None = None):
    """Drive the loop to the end; returns {request id: (final output, streamed new ids)}."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    finals, streamed, step = {}, {i: [] for i in ids}, 0
    while engine.has_unfinished():
        for output in engine.step():
            streamed[output.request_id] += output.new_token_ids
            if output.finished:
                finals[output.request_id] = output
        step += 1
        if abort_at and step in abort_at:
            assert engine.abort(abort_at[step])
    assert engine.block_manager.num_used_blocks == 0  # no KV leaked
    return [(finals[i], streamed[i]) for i in ids]


def tokens(results) -> list[list[int]]:
    return [final.token_ids for final, _ in results]


@pytest.fixture(scope="module")
def reference():
    return make_engine(overlap=False)


@pytest.fixture(scope="module")
def overlapped():
    return make_engine(overlap=True)


MIXED = [GREEDY, SEEDED, GREEDY, dataclasses.replace(SEEDED, seed=11, top_k=-1)]


def test_greedy_and_seeded_tokens_equal_with_overlap_on_and_off(reference, overlapped):
    expected = tokens(run(reference, PROMPTS, MIXED))
    assert tokens(run(overlapped, PROMPTS, MIXED)) == expected


def test_full_decode_graphs_sample_as_eager_with_overlap_on_and_off(reference):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the graph engine needs TRITON_INTERPRET=1 (set by .ci/run)")
    # The long prompt arrives in chunks beside the others' decode rows: mixed batches whose
    # decode ids, sampled by the step in flight, reach a FULL mixed graph on the device only.
    prompts = ["hi", "a", "xyz", "the quick brown fox jumps over the lazy dog"]
    params = [GREEDY, SEEDED, dataclasses.replace(GREEDY, logprobs=3), GREEDY]
    params = [dataclasses.replace(p, max_tokens=5) for p in params]
    expected = run(reference, prompts, params)
    graphs = make_engine(overlap=True, graphs=True)
    for overlap in (True, False):
        graphs.config = dataclasses.replace(graphs.config, overlap_schedule=overlap)
        got = run(graphs, prompts, params)
        assert tokens(got) == tokens(expected)
        for (final, _), (want, _) in zip(got[2:3], expected[2:3], strict=True):
            for lp, want_lp in zip(final.logprobs, want.logprobs, strict=True):
                assert lp.top.keys() == want_lp.top.keys()
                assert lp.logprob == pytest.approx(want_lp.logprob, abs=1e-4)
    paths = graphs.stats()["dispatch"]["paths"]
    assert paths["full"] >= 2 * 4  # every decode step of both runs sampled in the graph
    assert paths["full_mixed"] >= 2  # the prefills (and mixed steps) of both runs


def test_a_decode_graph_feeds_from_a_step_wider_than_its_ladder(reference):
    """Five rows decode outside the FULL decode graphs (their ladder stops at 4); the first
    request then stops, and the four left (rows 1-4 of the step in flight) replay a graph of
    4 whose first kernel reads their ids from that 5-row step: the tokens are eager's."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the graph engine needs TRITON_INTERPRET=1 (set by .ci/run)")
    prompts = ["hi", "a", "xyz", "b c", "tesela"]
    params = [dataclasses.replace(GREEDY, max_tokens=2)] + [
        dataclasses.replace(GREEDY, max_tokens=5)
    ] * 4
    expected = tokens(run(reference, prompts, params))
    graphs = make_engine(overlap=True, graphs=True)
    assert tokens(run(graphs, prompts, params)) == expected
    assert graphs.stats()["dispatch"]["paths"]["full"] >= 2


def test_decode_steps_are_built_where_their_graph_reads_them():
    """An engine's decode batch is uploaded into the FULL decode graphs' pack buffer (planning
    its replay copies nothing), the largest and widest one too, and gives the eager engine's
    logits."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the graph engine needs TRITON_INTERPRET=1 (set by .ci/run)")
    from tesela.core.forward_batch import BatchInputs, token_src_at

    graphs = make_engine(overlap=False, graphs=True)
    inputs = BatchInputs(
        token_ids=[[5], [6]], prefix_lens=[3, 9], block_tables=[[1], [2]], block_size=16
    )
    logits = graphs.runner.execute(inputs)
    buffer = graphs.runner.full_decode.pack_buffer
    assert buffer[:4].tolist() == [2, 2, 1, 0]  # this batch's header
    # Its whole pack, uploaded in place: planning would copy only up to token_src (-1, -1),
    # not the logits indices (int64 0 and 1) after it.
    at = token_src_at(2, 2, 1)
    assert buffer[at : at + 2].tolist() == [-1, -1]
    assert buffer[at + 4 : at + 8].tolist() == [0, 0, 1, 0]  # after a 16-byte alignment gap
    assert graphs.stats()["dispatch"]["paths"]["full"] == 1
    # The largest graph's batch at the widest block tables, every row fed from a step in
    # flight, goes in place too: the buffer holds a whole pack, logits and feed lists included.
    widest = BatchInputs(
        token_ids=[[1]] * 4,
        prefix_lens=[255] * 4,  # 256 tokens: max_model_len, 16 blocks
        block_tables=[list(range(16 * row + 1, 16 * row + 17)) for row in range(4)],
        block_size=16,
        feed_dst=(0, 1, 2, 3),
        feed_src=(3, 2, 1, 0),
    )
    assert widest.build(buffer.device, into=buffer).pack().data_ptr() == buffer.data_ptr()
    expected = make_engine(overlap=False).runner.execute(inputs)  # the same (fresh) KV pool
    assert logits.argmax(-1).tolist() == expected.argmax(-1).tolist()
    torch.testing.assert_close(logits, expected, rtol=1e-3, atol=1e-3)


def launches(engine: LLMEngine) -> int:
    return sum(engine.stats()["dispatch"]["paths"].values())


def test_each_step_is_read_back_one_step_later(reference, overlapped):
    one = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    before = {id(e): launches(e) for e in (reference, overlapped)}
    for engine in (reference, overlapped):
        engine.add_request("z", one, request_id="late")
    token = reference.step()[0].new_token_ids
    assert token == reference.requests["late"].output_token_ids
    assert overlapped.step() == []  # launched; its token is still on the device
    request = overlapped.requests["late"]
    assert request.num_inflight_tokens == 1 and request.output_token_ids == []
    second = overlapped.step()  # launches the next decode step, then reads the first
    assert request.num_inflight_tokens == 1 and request.output_token_ids == token
    assert [o.new_token_ids for o in second] == [token]
    for engine in (reference, overlapped):
        while engine.has_unfinished():
            engine.step()
    # The step that drew the last token (by length) is not followed by a wasted one.
    assert launches(overlapped) - before[id(overlapped)] == 3
    assert launches(reference) - before[id(reference)] == 3
    assert overlapped.block_manager.num_used_blocks == 0


def test_stops_are_exact_and_nothing_extra_is_streamed(reference, overlapped):
    free = tokens(run(reference, PROMPTS, GREEDY))
    text = ByteTokenizer().decode(free[2])
    stops = [
        SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(free[0][2],)),
        SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=text[3:5]),
        SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
    ]
    expected = run(reference, PROMPTS, stops)
    got = run(overlapped, PROMPTS, stops)
    assert tokens(got) == tokens(expected)
    assert tokens(got)[0] == free[0][:3] and len(tokens(got)[1]) == 3
    for (final, streamed), (want, _) in zip(got, expected, strict=True):
        assert streamed == final.token_ids  # no token past the stop reached the user
        assert (final.text, final.finish_reason) == (want.text, want.finish_reason)


def test_preemption_under_overlap_completes_every_request_unchanged(reference):
    expected = tokens(run(reference, PROMPTS, MIXED))
    # 10 blocks of 4 tokens: not enough for all requests at once, enough for each alone.
    small = make_engine(overlap=True, num_kv_tokens=40, block_size=4)
    assert tokens(run(small, PROMPTS, MIXED)) == expected
    assert small.scheduler.num_preemptions > 0


def test_a_request_ending_at_max_model_len_keeps_its_last_token_in_flight():
    """Prompt + max_tokens = max_model_len: under overlap the last token is launched while the
    one before is in flight. Reading that one back must not end the request by length (the
    in-flight token was scheduled because it fits): overlap on and off return the same tokens."""
    prompt = list(range(5, 25))  # 20 token ids
    results = {
        overlap: run(make_engine(overlap, max_model_len=28), [prompt], GREEDY)
        for overlap in (False, True)
    }
    assert [len(t) for t in tokens(results[True])] == [GREEDY.max_tokens]
    assert tokens(results[True]) == tokens(results[False])
    assert results[True][0][0].finish_reason == "length"


def test_abort_with_a_token_in_flight_frees_its_blocks(reference, overlapped):
    expected = tokens(run(reference, PROMPTS, GREEDY))
    ids = [f"req-{i}" for i in range(len(PROMPTS))]
    prompts = dict(zip(ids, PROMPTS, strict=True))
    for request_id in ids:
        overlapped.add_request(prompts[request_id], GREEDY, request_id=request_id)
    for _ in range(6):
        overlapped.step()
    victim = overlapped.requests["req-1"]
    at_abort = list(victim.output_token_ids)
    assert victim.num_inflight_tokens == 1 and overlapped.abort("req-1")
    finals, victim_outputs = {}, []
    while overlapped.has_unfinished():
        for output in overlapped.step():
            finals[output.request_id] = output.token_ids
            if output.request_id == "req-1":
                victim_outputs.append(output)
    # Its in-flight token was dropped: nothing new reaches the user after the abort.
    assert all(o.finished and not o.new_token_ids for o in victim_outputs)
    assert victim.output_token_ids == at_abort
    assert victim.finish_reason == "abort"
    for i in (0, 2, 3):
        assert finals[ids[i]] == expected[i]
    assert overlapped.block_manager.num_used_blocks == 0


def test_host_processor_path_samples_what_the_device_path_samples(reference, monkeypatch):
    """Rows with logit processors take their logits out of the forward and sample with the same
    function: with no processor set, the tokens must not change, overlap on or off."""
    expected = tokens(run(reference, PROMPTS, MIXED))
    engine = make_engine(overlap=True)
    monkeypatch.setattr(engine.sampler, "uses_host_processors", lambda params: True)
    monkeypatch.setattr(engine.sampler, "needs_history", lambda params: True)
    assert tokens(run(engine, PROMPTS, MIXED)) == expected
    assert engine._inflight is None


def test_prefix_blocks_register_at_launch_and_never_with_an_in_flight_id():
    """A prefill chunk's full blocks are shared once launched; a block whose last token is in
    flight waits for that id (hashing what the host knows would register a wrong hash) and is
    registered when the step that sampled it is resolved."""
    from tesela.config import SchedulerConfig
    from tesela.engine.block_manager import BlockManager
    from tesela.engine.request import Request
    from tesela.engine.scheduler import Scheduler

    blocks = BlockManager(32, block_size=4)
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=4, max_model_len=64)
    scheduler = Scheduler(config, blocks)
    request = Request("a", [11, 12, 13, 14, 15, 16, 17], GREEDY)
    scheduler.add(request)
    chunk = scheduler.schedule()
    scheduler.launched(chunk)
    assert blocks.num_cached_blocks == 1  # positions 0-3, written by this launch
    scheduler.resolve(chunk, [None])
    last_chunk = scheduler.schedule()  # positions 4-6: samples position 7
    scheduler.launched(last_chunk)
    decode = scheduler.schedule()  # overlap: position 7 runs before its id is read
    scheduler.launched(decode)
    assert request.num_inflight_tokens == 2 and blocks.num_cached_blocks == 1
    scheduler.resolve(last_chunk, [42])
    assert blocks.num_cached_blocks == 2
    twin = Request("b", [11, 12, 13, 14, 15, 16, 17, 42, 9], GREEDY)
    assert blocks.find_cached_prefix(twin) == request.block_ids[:2]


def emitted_block_hashes(engine: LLMEngine, requests) -> set[bytes]:
    """Every full block's hash over what each request really holds: prompt + emitted output."""
    size, allowed = engine.block_manager.block_size, set()
    for request in requests:
        tokens, parent = request.all_token_ids, None
        for start in range(0, len(tokens) - size + 1, size):
            parent = hash_block(parent, tokens[start : start + size], request.extra_keys)
            allowed.add(parent)
    return allowed


def test_prefix_cache_holds_only_emitted_tokens_under_overlap(reference):
    """With overlap, a decode row's input id is in flight when its block fills: that block is
    registered only once the id is read back, and a token drawn after a stop never is. A second
    round of the same prompts hits the cache and answers as the engine without overlap."""
    shared = "a shared system prompt, then: "
    prompts = [shared + tail for tail in ("one", "two two", "three", "4")]
    free = tokens(run(reference, prompts, GREEDY))
    stops = [
        GREEDY,
        dataclasses.replace(GREEDY, stop_token_ids=(free[1][3],)),
        dataclasses.replace(GREEDY, stop=ByteTokenizer().decode(free[2])[2:4]),
        dataclasses.replace(GREEDY, max_tokens=5),
    ]
    expected = tokens(run(reference, prompts, stops))
    engine = make_engine(overlap=True, block_size=4)
    kept = []
    engine.scheduler.pop_finished = _keeping(engine.scheduler.pop_finished, kept)
    assert tokens(run(engine, prompts, stops)) == expected
    cache = engine.block_manager
    assert set(cache._cached) <= emitted_block_hashes(engine, kept)
    assert tokens(run(engine, prompts, stops)) == expected  # now from the cache
    assert cache.stats.hit_tokens >= len(prompts) * (len(shared) // 4) * 4
    assert set(cache._cached) <= emitted_block_hashes(engine, kept)


def _keeping(pop_finished, kept: list):
    def pop():
        finished = pop_finished()
        kept.extend(finished)
        return finished

    return pop


def test_lora_requests_equal_with_overlap_on_and_off(checkpoints, lora_adapters):
    """Base rows and two adapters in one batch: overlap feeds in-flight ids without touching
    the per-row adapter ids."""
    path = str(checkpoints["llama"][0])
    loras = [None] + [r for r, _ in lora_adapters["llama"].all()[:2]]
    prompts = [[3, 9, 27, 81], [5, 6, 7], [100, 200, 3, 4, 5, 6]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    results = {}
    for overlap in ("off", "on"):
        llm = LLM(
            path, dtype="float32", enable_lora=True, max_lora_rank=8, overlap_schedule=overlap
        )
        assert llm.engine.config.overlap_schedule == (overlap == "on")
        outputs = llm.generate(prompts, params, lora_request=loras)
        results[overlap] = [o.token_ids for o in outputs]
        assert llm.engine.block_manager.num_used_blocks == 0
    assert results["on"] == results["off"]


def test_overlap_option_resolves_per_device_and_refuses_tensor_parallel():
    def resolved(**kwargs) -> bool:
        return make_engine_config("tiny", device="cpu", **kwargs)[0].overlap_schedule

    assert resolved() is False  # auto on CPU: every op runs on the host, nothing to hide
    assert resolved(overlap_schedule="on") is True
    assert resolved(tensor_parallel_size=2) is False  # auto under TP: off
    with pytest.raises(ValueError, match="overlap_schedule='on'.*tensor_parallel_size=2"):
        make_engine_config("tiny", device="cpu", overlap_schedule="on", tensor_parallel_size=2)
