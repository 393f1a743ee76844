"""Turning logits into tokens for the engine: per-request seeds, the eager sampling path, and
reading sampled tokens and logprobs back on the host.

The sampling itself is `tesela.executor.sampling.sample`, the very function the FULL decode
graphs capture, so eager and graph sampling agree. Every request gets a 32-bit seed: its own
`SamplingParams.seed`, or one derived from the engine seed and the order requests were first
sampled in. A row's draw is keyed by (seed, index of the output token it draws), so a seeded
request draws the same tokens in any batch, on any path, with overlap scheduling on or off.
"""

from __future__ import annotations

import itertools

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
            # hash32 works on Python ints too: a well-mixed seed per request, in arrival order.
            order = (self.seed ^ next(self._counter) * 0x9E3779B1) & 0xFFFFFFFF
            seed = self._request_seeds[request_id] = hash32(order)
        return seed

    @staticmethod
    def uses_host_processors(params: list[SamplingParams]) -> bool:
        """Whether some row needs logit processors that `sample` does not run (the engine then
        takes the logits out of the forward and samples with `Sampler.sample`)."""
        return False

    @staticmethod
    def needs_history(params: SamplingParams) -> bool:
        """Whether sampling this request reads its token ids on the host (the engine then
        reads each step back before building the next)."""
        return False

    def tensors(
        self,
        params: list[SamplingParams],
        request_ids: list[str],
        indices: list[int],
        vocab: int,
    ) -> SamplingTensors:
        seeds = [self.seed_of(p, r) for p, r in zip(params, request_ids, strict=True)]
        return SamplingTensors.build(params, seeds, indices, vocab, self.device)

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        request_ids: list[str],
        indices: list[int],
    ) -> SampleOutput:
        """The eager path: sample `logits` on the device; nothing is read back."""
        tensors = self.tensors(params, request_ids, indices, logits.shape[-1])
        return sample(logits, tensors, variant_for(params))

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        request_ids: list[str],
        indices: list[int],
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Sample and read back at once (a synchronizing convenience)."""
        return read_back(self.sample(logits, params, request_ids, indices).to_host(), params)


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
