"""The sampler's logit processors, each for its effect, on batches whose rows differ; and seeded
requests that draw the same tokens whatever else shares their batch."""

from __future__ import annotations

import math

import pytest
import torch

from tesela import LLM, SamplingParams
from tesela.engine.sampler import Sampler, SamplingHistory, apply_logit_processors

VOCAB = 8
EOS = 7


def history(output=(), prompt=(0,), stop=(EOS,)) -> SamplingHistory:
    return SamplingHistory(list(prompt), list(output), tuple(stop))


def process(logits, *rows: tuple[SamplingParams, SamplingHistory]) -> torch.Tensor:
    params = [p for p, _ in rows]
    return apply_logit_processors(logits.clone(), params, [h for _, h in rows])


def base_logits(rows: int = 2) -> torch.Tensor:
    return torch.tensor([[1.0, -1.0, 2.0, 0.5, 0.0, 0.0, 0.0, 3.0]] * rows)


def test_presence_and_frequency_penalties_count_output_tokens_per_row():
    logits = base_logits()
    out = process(
        logits,
        (SamplingParams(presence_penalty=1.5), history(output=[2, 2, 3])),
        (SamplingParams(frequency_penalty=0.5), history(output=[2, 2, 3])),
    )
    expected = logits.clone()
    expected[0, 2] -= 1.5  # once per distinct token
    expected[0, 3] -= 1.5
    expected[1, 2] -= 1.0  # per occurrence
    expected[1, 3] -= 0.5
    torch.testing.assert_close(out, expected)


def test_repetition_penalty_covers_the_prompt_and_keeps_signs_right():
    logits = base_logits(1)
    out = process(logits, (SamplingParams(repetition_penalty=2.0), history([1], prompt=[2, 4])))
    expected = logits.clone()
    expected[0, 2] = 1.0  # 2.0 / 2: positive logits shrink
    expected[0, 1] = -2.0  # -1.0 * 2: negative logits grow more negative
    expected[0, 4] = 0.0  # zero stays zero
    torch.testing.assert_close(out, expected)


def test_min_tokens_masks_stop_tokens_until_reached():
    logits = base_logits()
    out = process(
        logits,
        (SamplingParams(min_tokens=3), history(output=[1, 2], stop=(EOS, 5))),
        (SamplingParams(min_tokens=2), history(output=[1, 2], stop=(EOS, 5))),
    )
    assert out[0, EOS] == -math.inf and out[0, 5] == -math.inf
    torch.testing.assert_close(out[1], logits[1])  # already has its 2 tokens


def test_logit_bias_adds_per_row():
    logits = base_logits()
    out = process(
        logits,
        (SamplingParams(logit_bias={1: 10.0, 2: -5.0}), history()),
        (SamplingParams(), history()),
    )
    assert out[0, 1] == pytest.approx(9.0) and out[0, 2] == pytest.approx(-3.0)
    torch.testing.assert_close(out[1], logits[1])


def test_min_p_and_greedy_rows_through_the_sampler():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = base_logits()
    params = [
        SamplingParams(temperature=1.0, min_p=0.9, seed=1),  # only the top token survives
        SamplingParams(temperature=0.0, logit_bias={0: 100.0}),
    ]
    histories = [history(), history()]
    for step in range(20):
        tokens, _ = sampler(logits, params, ["a", "b"], [step, step], histories)
        assert tokens == [EOS, 0]


def test_seeded_requests_do_not_depend_on_the_batch():
    llm = LLM("tiny", max_num_seqs=8)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    alone = llm.generate("seeded", seeded)[0].token_ids
    neighbours = [
        SamplingParams(max_tokens=5, temperature=1.0, presence_penalty=1.0),
        SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.3, min_tokens=3),
        SamplingParams(max_tokens=9, temperature=0.8, logit_bias={65: 3.0}, seed=9),
    ]
    together = llm.generate(["a", "seeded", "bb", "ccc"], [neighbours[0], seeded, *neighbours[1:]])
    assert together[1].token_ids == alone


def test_prompt_logprobs_match_transformers_across_prefill_chunks(checkpoints):
    path, hf_model = checkpoints["qwen2"]
    prompt = [5, 17, 3, 99, 42, 7, 250, 11, 64, 8, 13, 200, 31, 4]
    llm = LLM(str(path), max_num_batched_tokens=5, block_size=4)  # three prefill chunks
    output = llm.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=3))[0]
    with torch.no_grad():
        reference = hf_model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(prompt)
    for position in range(1, len(prompt)):
        entry = output.prompt_logprobs[position]
        expected = reference[position - 1]
        assert entry.token_id == prompt[position]
        assert entry.logprob == pytest.approx(expected[prompt[position]].item(), abs=1e-4)
        top_ids = expected.topk(3).indices.tolist()
        assert list(entry.top) == top_ids
