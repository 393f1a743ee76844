"""Turning logits into tokens: greedy, temperature, top-k, top-p, min-p, per-request seeds,
logprobs, and the logit processors (presence/frequency/repetition penalties, min_tokens,
logit_bias), each vectorised over the batch and skipped when no row uses it.

The processors run on every row before greedy or random selection, as in vLLM; logprobs are
those of the raw model distribution. Random rows use the exponential-race form of sampling (argmax of p / E with E ~ Exp(1)), which
needs one noise vector per row: a request with a seed draws its noise from its own generator,
so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tesela.engine.request import TokenLogprobs
from tesela.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingHistory:
    """What a row has seen: its prompt, its output so far, and the ids that end it."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    stop_token_ids: tuple[int, ...] = ()


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._global = torch.Generator(device=device).manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._request_generators.pop(request_id, None)

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        request_ids: list[str],
        histories: list[SamplingHistory] | None = None,
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """One token per row. `histories` (prompt and output tokens of each row) are needed
        only when a row uses penalties or min_tokens."""
        logits = logits.float()
        raw_logits = logits
        logits = apply_logit_processors(logits, params, histories)
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
        return token_list, self._logprobs(raw_logits, params, token_list)

    def _sample(self, logits, params: list[SamplingParams], request_ids: list[str]):
        temperature = torch.tensor([p.temperature for p in params], device=logits.device)
        logits = logits / temperature[:, None]
        logits = _apply_top_k(logits, [p.top_k for p in params])
        logits = _apply_top_p(logits, [p.top_p for p in params])
        probs = _apply_min_p(logits.softmax(dim=-1), [p.min_p for p in params])
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


def _apply_min_p(probs: torch.Tensor, min_ps: list[float]) -> torch.Tensor:
    if all(p <= 0.0 for p in min_ps):
        return probs
    threshold = torch.tensor(min_ps, device=probs.device)[:, None] * probs.amax(-1, keepdim=True)
    return probs.masked_fill(probs < threshold, 0.0)


# ---- logit processors -----------------------------------------------------------------------


def apply_logit_processors(
    logits: torch.Tensor, params: list[SamplingParams], histories: list[SamplingHistory] | None
) -> torch.Tensor:
    """Penalties, min_tokens and logit_bias for every row that asks for them."""
    if any(p.needs_history for p in params):
        if histories is None:
            raise ValueError("penalties and min_tokens need each row's token history")
        logits = _apply_penalties(logits, params, histories)
        logits = _apply_min_tokens(logits, params, histories)
    if any(p.logit_bias for p in params):
        logits = _apply_logit_bias(logits, params)
    return logits


def _token_counts(rows: list[list[int]], vocab: int, device) -> torch.Tensor:
    """[rows, vocab] occurrence counts, built with one scatter over padded rows."""
    width = max((len(r) for r in rows), default=0)
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    if width:
        # Pad with `vocab`: an extra column that is dropped afterwards.
        padded = torch.tensor([r + [vocab] * (width - len(r)) for r in rows], device=device)
        counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab]


def _apply_penalties(logits, params: list[SamplingParams], histories: list[SamplingHistory]):
    vocab, device = logits.shape[-1], logits.device
    presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
    frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
    repetition = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
    output_counts = _token_counts([h.output_token_ids for h in histories], vocab, device)
    if bool((repetition != 1.0).any()):
        # The CTRL paper's penalty, over prompt and output: positive logits shrink, negative
        # ones grow, so a seen token always becomes less likely.
        prompt_seen = _token_counts([h.prompt_token_ids for h in histories], vocab, device) > 0
        seen = prompt_seen | (output_counts > 0)
        scaled = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, scaled, logits)
    logits = logits - frequency * output_counts
    return logits - presence * (output_counts > 0).to(logits.dtype)


def _apply_min_tokens(logits, params: list[SamplingParams], histories: list[SamplingHistory]):
    rows, ids = [], []
    for row, (p, h) in enumerate(zip(params, histories, strict=True)):
        if len(h.output_token_ids) < p.min_tokens:
            for token in h.stop_token_ids:
                rows.append(row)
                ids.append(token)
    if not rows:
        return logits
    index = (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device))
    return logits.index_put(index, torch.tensor(float("-inf"), device=logits.device))


def _apply_logit_bias(logits, params: list[SamplingParams]):
    rows = [row for row, p in enumerate(params) for _ in p.logit_bias]
    ids = [token for p in params for token, _ in p.logit_bias]
    bias = [value for p in params for _, value in p.logit_bias]
    device = logits.device
    index = (torch.tensor(rows, device=device), torch.tensor(ids, device=device))
    return logits.index_put(index, torch.tensor(bias, device=device), accumulate=True)
