"""Turning logits into tokens: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Random rows use the exponential-race form of sampling (argmax of p / E with E ~ Exp(1)), which
needs one noise vector per row: a request with a seed draws its noise from its own generator,
so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from tesela.engine.request import TokenLogprobs
from tesela.engine.sampling_params import SamplingParams


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._global = torch.Generator(device=device).manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._request_generators.pop(request_id, None)

    def __call__(
        self, logits: torch.Tensor, params: list[SamplingParams], request_ids: list[str]
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            picked = self._sample(
                logits[rows],
                [params[i] for i in random_rows],
                [request_ids[i] for i in random_rows],
            )
            tokens = tokens.index_copy(0, rows, picked)
        token_list = tokens.tolist()
        return token_list, self._logprobs(logits, params, token_list)

    def _sample(self, logits, params: list[SamplingParams], request_ids: list[str]):
        temperature = torch.tensor([p.temperature for p in params], device=logits.device)
        logits = logits / temperature[:, None]
        logits = _apply_top_k(logits, [p.top_k for p in params])
        logits = _apply_top_p(logits, [p.top_p for p in params])
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs)
        for row, (p, rid) in enumerate(zip(params, request_ids, strict=True)):
            noise[row].exponential_(generator=self._generator(p, rid))
        return (probs / noise).argmax(dim=-1)

    def _generator(self, params: SamplingParams, request_id: str) -> torch.Generator:
        if params.seed is None:
            return self._global
        generator = self._request_generators.get(request_id)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
            self._request_generators[request_id] = generator
        return generator

    @staticmethod
    def _logprobs(logits, params: list[SamplingParams], tokens: list[int]):
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        result: list[TokenLogprobs | None] = [None] * len(params)
        if not wanted:
            return result
        logprobs = torch.log_softmax(logits[wanted], dim=-1)
        k = max(params[i].logprobs for i in wanted)
        top_values, top_ids = logprobs.topk(max(k, 1), dim=-1)
        chosen = logprobs.gather(
            1, torch.tensor([[tokens[i]] for i in wanted], device=logits.device)
        )
        top_values, top_ids, chosen = top_values.tolist(), top_ids.tolist(), chosen.tolist()
        for j, i in enumerate(wanted):
            n = params[i].logprobs
            top = dict(zip(top_ids[j][:n], top_values[j][:n], strict=True))
            result[i] = TokenLogprobs(tokens[i], chosen[j][0], top)
        return result


def _apply_top_k(logits: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    vocab = logits.shape[-1]
    ks = [k if 0 < k < vocab else vocab for k in top_ks]
    if all(k == vocab for k in ks):
        return logits
    k_tensor = torch.tensor(ks, device=logits.device)
    sorted_logits = logits.sort(dim=-1, descending=True).values
    threshold = sorted_logits.gather(1, (k_tensor - 1)[:, None])
    return logits.masked_fill(logits < threshold, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    if all(p >= 1.0 for p in top_ps):
        return logits
    p_tensor = torch.tensor(top_ps, device=logits.device)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the mass before it already reaches top_p (the first always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p_tensor[:, None]
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
