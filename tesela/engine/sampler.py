"""Turning logits into tokens for the engine: per-request seeds, the eager sampling path, the
logit processors (presence/frequency/repetition penalties, min_tokens, logit_bias), and reading
sampled tokens and logprobs back on the host.

The sampling itself is `tesela.executor.sampling.sample`, the very function the FULL decode
graphs capture, so eager and graph sampling agree. Every request gets a 32-bit seed: its own
`SamplingParams.seed`, or one derived from the engine seed and the order requests were first
sampled in. A row's draw is keyed by (seed, index of the output token it draws), so a seeded
request draws the same tokens in any batch, on any path, with overlap scheduling on or off.

The processors run on the host-built logits before sampling, as in vLLM, vectorised over the
batch and skipped when no row uses them; rows that use them are sampled eagerly (the graphs do
not capture them), and logprobs stay those of the raw model distribution.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from tesela.engine.request import TokenLogprobs
from tesela.engine.sampling_params import SamplingParams
from tesela.executor.sampling import (
    SampleOutput,
    SamplingTensors,
    hash32,
    sample,
    variant_for,
)


@dataclass(frozen=True)
class SamplingHistory:
    """What a row has seen: its prompt, its output so far, and the ids that end it."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    stop_token_ids: tuple[int, ...] = ()


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.seed = seed
        self._counter = itertools.count()
        self._request_seeds: dict[str, int] = {}

    def forget(self, request_id: str) -> None:
        self._request_seeds.pop(request_id, None)

    def seed_of(self, params: SamplingParams, request_id: str) -> int:
        if params.seed is not None:
            return params.seed
        seed = self._request_seeds.get(request_id)
        if seed is None:
            # hash32 works on Python ints too: a well-mixed seed per drawing request, in the
            # order they first draw.
            order = (self.seed ^ next(self._counter) * 0x9E3779B1) & 0xFFFFFFFF
            seed = self._request_seeds[request_id] = hash32(order)
        return seed

    @staticmethod
    def uses_host_processors(params: list[SamplingParams]) -> bool:
        """Whether some row needs logit processors that `sample` does not run (the engine then
        takes the logits out of the forward and samples with `Sampler.sample`)."""
        return any(p.needs_history or p.logit_bias for p in params)

    @staticmethod
    def needs_history(params: SamplingParams) -> bool:
        """Whether sampling this request reads its token ids on the host (the engine then
        reads each step back before building the next)."""
        return params.needs_history

    def tensors(
        self,
        params: list[SamplingParams],
        request_ids: list[str],
        indices: list[int],
        vocab: int,
    ) -> SamplingTensors:
        # Greedy rows draw nothing: they take no seed, so an unseeded request's seed (its place
        # among the requests that draw) does not depend on which greedy rows shared its steps.
        seeds = [
            0 if p.greedy else self.seed_of(p, r) for p, r in zip(params, request_ids, strict=True)
        ]
        return SamplingTensors.build(params, seeds, indices, vocab, self.device)

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        request_ids: list[str],
        indices: list[int],
        histories: list[SamplingHistory] | None = None,
    ) -> SampleOutput:
        """The eager path: the logit processors, then `sample` on the device; nothing is read
        back. `histories` are needed only when a row uses penalties or min_tokens."""
        raw = logits.float()
        processed = apply_logit_processors(raw, params, histories)
        tensors = self.tensors(params, request_ids, indices, logits.shape[-1])
        return sample(processed, tensors, variant_for(params), logprob_logits=raw)

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        request_ids: list[str],
        indices: list[int],
        histories: list[SamplingHistory] | None = None,
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Sample and read back at once (a synchronizing convenience)."""
        sampled = self.sample(logits, params, request_ids, indices, histories)
        return read_back(sampled.to_host(), params)


def read_back(
    host: SampleOutput, params: list[SamplingParams]
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Tokens and the logprobs each row asked for, from a step's host copies."""
    tokens = host.tokens.tolist()
    result: list[TokenLogprobs | None] = [None] * len(params)
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not wanted:
        return tokens, result
    chosen = host.logprob.tolist()
    top_ids, top_values = host.top_ids.tolist(), host.top_logprobs.tolist()
    for i in wanted:
        n = params[i].logprobs
        top = dict(zip(top_ids[i][:n], top_values[i][:n], strict=True))
        result[i] = TokenLogprobs(tokens[i], chosen[i], top)
    return tokens, result


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
