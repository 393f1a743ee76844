"""tesela against transformers on the same random weights, read from a real checkpoint."""

from __future__ import annotations

import pytest
import torch

from tesela import LLM, SamplingParams

PROMPTS = [[5, 17, 42, 8, 99, 3], [7] * 3 + [250, 13], [300, 301, 12, 77, 54, 23, 9, 81, 44, 6, 1]]
MAX_TOKENS = 8


def hf_greedy(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens by step-by-step full forwards, and the logprobs of the final sequence."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return ids[len(prompt) :], logprobs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_greedy_tokens_and_logprobs_match_transformers(checkpoints, arch):
    path, hf_model = checkpoints[arch]
    llm = LLM(str(path), dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=3)
    outputs = llm.generate(PROMPTS, params)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        tokens, hf_logprobs = hf_greedy(hf_model, prompt)
        assert output.token_ids == tokens
        for step, token_logprobs in enumerate(output.logprobs):
            reference = hf_logprobs[len(prompt) - 1 + step]
            assert token_logprobs.token_id == tokens[step]
            expected = reference[tokens[step]].item()
            assert abs(token_logprobs.logprob - expected) <= 1e-4 * max(1.0, abs(expected))
            top_ids = reference.topk(3).indices.tolist()
            assert list(token_logprobs.top) == top_ids
            for token, value in token_logprobs.top.items():
                assert abs(value - reference[token].item()) <= 1e-4 * max(1.0, abs(value))


def test_config_is_read_from_the_checkpoint(checkpoints):
    path, _ = checkpoints["qwen3"]
    config = LLM(str(path), dtype="float32").engine.config.model_config
    assert config.architecture == "Qwen3ForCausalLM" and config.qk_norm
    assert config.tie_word_embeddings
    llama = LLM(str(checkpoints["llama"][0]), dtype="float32").engine.config.model_config
    assert llama.rope_scaling.rope_type == "llama3" and llama.rope_scaling.factor == 8.0


def test_text_prompts_use_the_checkpoint_tokenizer(checkpoints):
    path, hf_model = checkpoints["qwen2"]
    llm = LLM(str(path), dtype="float32")
    text = "t5 t17 t42 t8"
    assert llm.tokenizer.encode(text) == [5, 17, 42, 8]
    output = llm.generate(text, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    tokens, _ = hf_greedy(hf_model, [5, 17, 42, 8])
    assert output.token_ids == tokens[:4]
    assert output.text.split() == [f"t{t}" for t in tokens[:4]]
