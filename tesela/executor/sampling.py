"""Sampling on the device: one function that the eager path and the FULL decode graphs both run.

`sample(logits, tensors, variant)` turns a batch of logits into tokens (greedy, temperature,
top-k, top-p, min-p) and, when asked, the logprobs of the raw distribution. It reads every
per-row parameter from tensors (`SamplingTensors`), has no data-dependent Python and never
syncs with the host, so a CUDA graph can capture it: the FULL decode runner keeps one set of
persistent `SamplingTensors` and rewrites its rows before each replay.

Randomness is counter-based. A row's noise is a hash of (seed, token index, vocab id), so the
token a request draws depends only on its seed and on how many tokens it has produced: not on
the batch it is in, its row, the graph size, or whether a graph or the eager path ran it.
Sampling is the Gumbel-max form of the exponential race: argmax(logits / T + g) with
g = -log(-log(u)) and u the hashed uniform. The hash is murmur3's 32-bit finalizer applied on
int64 tensors; each multiply is split into 16-bit halves so no product overflows int64, which
makes the bits identical on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tesela.core.forward_batch import to_device_packed
from tesela.executor.argmax import argmax_rows

# logprobs are returned for at most this many alternatives (SamplingParams.logprobs <= 20), so a
# graph computes this many and the host keeps what each request asked for.
MAX_TOP_LOGPROBS = 20
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingVariant:
    """Which work a batch needs: captured graphs exist per variant, so a greedy-only batch runs
    no noise and a batch without top-k/top-p/min-p runs no sort."""

    random: bool = False  # some row samples (temperature > 0)
    filtered: bool = False  # some row uses top-k, top-p or min-p
    logprobs: bool = False  # some row asked for logprobs

    @property
    def reads_tensors(self) -> bool:
        """Whether `sample` reads the per-row `SamplingTensors`: only to draw. A greedy batch
        (logprobs or not) takes the argmax, so the engine builds and copies none for it."""
        return self.random

    def check_tensors(self, tensors: SamplingTensors | None) -> None:
        if self.reads_tensors and tensors is None:
            raise ValueError(f"{self} draws tokens: it needs the rows' SamplingTensors")

    @classmethod
    def all(cls) -> tuple[SamplingVariant, ...]:
        modes = ((False, False), (True, False), (True, True))
        return tuple(cls(r, f, lp) for r, f in modes for lp in (False, True))


@dataclass
class SamplingTensors:
    """Per-row sampling parameters as tensors (one row per sampled token).

    Disabled filters hold neutral values (top_k = vocab, top_p = 2, min_p = 0) so every row can
    run the same arithmetic; greedy rows hold temperature 1 and are picked by `greedy`."""

    temperature: torch.Tensor  # [n] float32
    greedy: torch.Tensor  # [n] bool
    top_k: torch.Tensor  # [n] int64
    top_p: torch.Tensor  # [n] float32
    min_p: torch.Tensor  # [n] float32
    seed: torch.Tensor  # [n] int64, in [0, 2^32)
    index: torch.Tensor  # [n] int64: which output token of its request this row draws

    FIELDS = ("temperature", "greedy", "top_k", "top_p", "min_p", "seed", "index")

    @property
    def num_rows(self) -> int:
        return int(self.seed.shape[0])

    @classmethod
    def build(cls, params, seeds: list[int], indices: list[int], vocab: int, device):
        """From SamplingParams (one per row), each row's seed and token index. The host lists
        travel through pinned memory without blocking (the GPU may still be busy)."""
        greedy = [p.temperature == 0.0 for p in params]
        values = {
            "temperature": ([1.0 if p.temperature == 0.0 else p.temperature for p in params], 0),
            "greedy": (greedy, 1),
            "top_k": ([p.top_k if 0 < p.top_k < vocab else vocab for p in params], 2),
            "top_p": ([p.top_p if p.top_p < 1.0 else 2.0 for p in params], 0),
            "min_p": ([float(getattr(p, "min_p", 0.0)) for p in params], 0),
            "seed": ([s & _MASK32 for s in seeds], 2),
            "index": (list(indices), 2),
        }
        dtypes = (torch.float32, torch.bool, torch.int64)
        arrays = {k: (v, dtypes[d]) for k, (v, d) in values.items()}
        return cls(**to_device_packed(arrays, device))

    @classmethod
    def empty(cls, rows: int, vocab: int, device) -> SamplingTensors:
        """Neutral rows (greedy, no filters): the persistent buffers of a graph."""
        return cls.build([_Neutral()] * rows, [0] * rows, [0] * rows, vocab, device)

    def copy_(self, source: SamplingTensors) -> None:
        """Write `source`'s rows into the first rows of these (persistent) tensors."""
        n = source.num_rows
        for name in self.FIELDS:
            getattr(self, name)[:n].copy_(getattr(source, name), non_blocking=True)

    def rows(self, n: int) -> SamplingTensors:
        return SamplingTensors(**{name: getattr(self, name)[:n] for name in self.FIELDS})


class _Neutral:
    """Greedy, no filters: the values padding rows of the persistent buffers start with."""

    temperature, top_k, top_p, min_p = 0.0, -1, 1.0, 0.0


def variant_for(params) -> SamplingVariant:
    random = any(p.temperature != 0.0 for p in params)
    filtered = random and any(
        (p.top_k > 0 or p.top_p < 1.0 or getattr(p, "min_p", 0.0) > 0.0)
        for p in params
        if p.temperature != 0.0
    )
    return SamplingVariant(random, filtered, any(p.logprobs is not None for p in params))


@dataclass
class SampleOutput:
    """What one step sampled, on the device (or, after `to_host`, on the host)."""

    tokens: torch.Tensor  # [n] int64
    logprob: torch.Tensor | None = None  # [n] float32: the sampled token's logprob
    top_ids: torch.Tensor | None = None  # [n, k] int64
    top_logprobs: torch.Tensor | None = None  # [n, k] float32

    def fields(self) -> tuple:
        return (self.tokens, self.logprob, self.top_ids, self.top_logprobs)

    def rows(self, n: int) -> SampleOutput:
        return SampleOutput(*(None if t is None else t[:n] for t in self.fields()))

    def to_host(self) -> SampleOutput:
        """Copies into pinned host memory, started without blocking: read them only after the
        step's event completed (tesela/engine/llm_engine.py does)."""

        return SampleOutput(*(None if t is None else _to_host(t) for t in self.fields()))


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t.clone()  # a graph's output is rewritten by its next replay: keep this step's
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


# ---- the sampling function ------------------------------------------------------------------


def sample(
    logits: torch.Tensor,
    t: SamplingTensors | None,
    variant: SamplingVariant,
    logprob_logits: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> SampleOutput:
    """Tokens for `logits` [n, vocab] under the per-row parameters `t` (module docstring; None
    where the variant reads none: `reads_tensors`), written into `out` (int64 [n]) when given.
    Logprobs come from `logprob_logits` when given (the raw model distribution, when the logits
    were processed first)."""
    variant.check_tensors(t)
    # Greedy tokens from the model's own logits: widening to float32 is exact, so the argmax
    # (the first maximum) is the same, without a cast over the vocabulary.
    tokens = argmax_rows(logits, None if variant.reads_tensors else out)
    if not (variant.reads_tensors or variant.logprobs):
        return SampleOutput(tokens)
    logits = logits.float()
    if variant.reads_tensors:
        scaled = logits / t.temperature[:, None]
        if variant.filtered:
            scaled = filter_logits(scaled, t)
        drawn = argmax_rows(scaled + gumbel_noise(t.seed, t.index, logits.shape[-1]))
        tokens = torch.where(t.greedy, tokens, drawn, out=out)
    if not variant.logprobs:
        return SampleOutput(tokens)
    logprobs = torch.log_softmax(logits if logprob_logits is None else logprob_logits, dim=-1)
    top_logprobs, top_ids = logprobs.topk(min(MAX_TOP_LOGPROBS, logits.shape[-1]), dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    return SampleOutput(tokens, chosen, top_ids, top_logprobs)


def filter_logits(scaled: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Mask what top-k, then top-p, then min-p drop (each neutral where a row does not use it)."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(scaled.shape[-1], device=scaled.device)[None, :]
    keep = rank < t.top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the mass before it already reaches top_p (the first always stays).
    keep &= probs.cumsum(dim=-1) - probs < t.top_p[:, None]
    keep &= probs >= t.min_p[:, None] * probs[:, :1]
    keep_vocab = torch.zeros_like(keep).scatter(1, order, keep)
    return scaled.masked_fill(~keep_vocab, float("-inf"))


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for x in [0, 2^32), with every product below 2^49."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's finalizer on int64 tensors holding 32-bit values: a bijection that mixes every
    input bit into every output bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


_VOCAB_KEYS: dict[tuple[int, str], torch.Tensor] = {}


def _vocab_keys(vocab: int, device: torch.device) -> torch.Tensor:
    # Constant per (vocab, device): made once, outside any graph capture, and kept alive (a
    # captured graph reads it at a fixed address).
    key = (vocab, str(device))
    keys = _VOCAB_KEYS.get(key)
    if keys is None:
        ids = torch.arange(vocab, dtype=torch.int64, device=device)
        keys = _VOCAB_KEYS[key] = hash32(_mul32(ids, 0x9E3779B1) ^ 0x5BD1E995)
    return keys


def prepare_vocab_keys(vocab: int, device) -> None:
    """Make the per-vocab hash constants before a graph capture reads them."""
    _vocab_keys(vocab, torch.device(device))


def uniform_noise(seed: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    """[n, vocab] float32 uniforms in (0, 1), a function of (seed, index, vocab id) only."""
    row_key = hash32(hash32(seed) ^ _mul32(index & _MASK32, 0x27D4EB2F))
    bits = hash32(row_key[:, None] ^ _vocab_keys(vocab, seed.device)[None, :])
    # 24 random bits, centred in their interval: never exactly 0 or 1.
    return ((bits >> 8).float() + 0.5) * (1.0 / 16777216.0)


def gumbel_noise(seed: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    return -torch.log(-torch.log(uniform_noise(seed, index, vocab)))
