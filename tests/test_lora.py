"""Multi-LoRA serving against transformers + peft on real checkpoints and adapters on disk."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tesela import LLM, LoRARequest, SamplingParams
from tesela.lora.adapter import LoRAAdapterError

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (rank, alpha, rsLoRA, target modules): full, a subset with rsLoRA, a smaller rank
ADAPTERS = {
    "full": (8, 16, False, ALL_MODULES),
    "rslora": (4, 8, True, ["q_proj", "v_proj", "down_proj"]),
    "mlp": (2, 4, False, ["gate_proj", "up_proj", "o_proj"]),
}
PROMPTS = [[5, 17, 42, 8, 99, 3], [300, 301, 12, 77, 54, 23, 9, 81, 44, 6, 1]]
MAX_TOKENS = 6


def write_adapter(base_path, out_path, name: str, seed: int):
    """A PEFT adapter with random, non-zero A and B, saved by peft itself; the peft model."""
    import peft
    import transformers

    rank, alpha, rslora, modules = ADAPTERS[name]
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        use_rslora=rslora,
        target_modules=modules,
        init_lora_weights=False,  # random B: the adapter really changes the outputs
    )
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_" in param_name:
                param.normal_(0.0, 0.2)
    model.save_pretrained(out_path)
    return model.eval()


class Adapters(dict):
    """arch -> {adapter name: (LoRARequest, peft model)}, written on first use."""

    def __init__(self, checkpoints, tmp_path_factory) -> None:
        super().__init__()
        self.checkpoints, self.tmp = checkpoints, tmp_path_factory

    def __missing__(self, arch: str):
        path = self.checkpoints[arch][0]
        self[arch] = {}
        for i, name in enumerate(ADAPTERS):
            folder = self.tmp.mktemp(f"{arch}-{name}")
            model = write_adapter(path, folder, name, seed=10 + i)
            self[arch][name] = (LoRARequest(name, i + 1, str(folder)), model)
        return self[arch]


@pytest.fixture(scope="module")
def adapters(checkpoints, tmp_path_factory):
    return Adapters(checkpoints, tmp_path_factory)


def hf_greedy(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return ids[len(prompt) :], logprobs


def params() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_greedy_tokens_and_logprobs_match_peft(checkpoints, adapters, arch):
    path, base_model = checkpoints[arch]
    llm = LLM(str(path), dtype="float32", device="cpu", enable_lora=True, max_lora_rank=8)
    for name, (request, peft_model) in adapters[arch].items():
        outputs = llm.generate(PROMPTS, params(), lora_request=request)
        for prompt, output in zip(PROMPTS, outputs, strict=True):
            tokens, reference = hf_greedy(peft_model, prompt)
            base_tokens, _ = hf_greedy(base_model, prompt)
            assert output.token_ids == tokens, name
            for step, lp in enumerate(output.logprobs):
                expected = reference[len(prompt) - 1 + step][tokens[step]].item()
                assert abs(lp.logprob - expected) <= 1e-4 * max(1.0, abs(expected)), name
        assert any(hf_greedy(peft_model, p)[0] != hf_greedy(base_model, p)[0] for p in PROMPTS)


@pytest.mark.parametrize(
    "backend,graph",
    [("torch", "none"), ("torch", "breakable"), ("triton", "breakable")],
)
def test_a_batch_mixing_base_rows_and_three_adapters_equals_each_alone(
    checkpoints, adapters, backend, graph
):
    """One batch: base rows and rows of 3 adapters (one adapter twice, apart), prefill then
    decode, through the piecewise runner's CPU path; each row equals its request run alone."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton LoRA kernels run on CPU under TRITON_INTERPRET=1")
    path, _ = checkpoints["qwen2"]
    requests = [r for r, _ in adapters["qwen2"].values()]
    llm = LLM(
        str(path), dtype="float32", device="cpu", enable_lora=True, max_lora_rank=8,
        lora_backend=backend, prefill_graph=graph, capture_sizes=[4, 16, 64],
    )  # fmt: skip
    prompts = PROMPTS + [[9, 8, 7], [40, 41, 42, 43], PROMPTS[0], [11, 12]]
    loras = [None, requests[0], requests[1], None, requests[2], requests[0]]
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    together = llm.generate(prompts, sp, lora_request=loras)
    alone = [llm.generate(p, sp, lora_request=lora)[0] for p, lora in zip(prompts, loras)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    # Adapters matter: the same prompt differs between the base model and an adapter.
    assert together[0].token_ids != together[4].token_ids
    stats = llm.engine.stats()["dispatch"]["paths"]
    assert stats["piecewise" if graph != "none" else "eager"] > 0
