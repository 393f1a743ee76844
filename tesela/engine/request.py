"""A request's life: tokens, KV blocks, status, outputs. Imports no torch."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from tesela.engine.sampling_params import SamplingParams
from tesela.engine.text import TextBuffer, TextSnapshot


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprobs:
    """The sampled token's logprob and the top-k alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float]


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int = 0
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_preemptions: int = 0
    # The text so far (a snapshot of the detokenizer's buffer: set in O(1) each step)
    output_text: TextSnapshot = field(default_factory=lambda: TextBuffer().snapshot())
    # Tokens sampled on the device whose ids the host has not read yet (overlap scheduling:
    # up to two, of which only the last can be an input of the next batch). They count in
    # num_tokens, not in all_token_ids.
    num_inflight_tokens: int = 0
    # Prompt position i -> logprob of prompt token i (i >= 1), when prompt_logprobs is asked.
    prompt_logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)
    # Prefix caching: requests share cached KV only when these agree (a LoRA adapter changes
    # the KV; a salt keeps one tenant's prefix out of another's reach).
    lora_id: str | None = None
    lora_int_id: int = 0  # the LoRA adapter this request runs with (0: the base model)
    cache_salt: str | None = None
    num_cached_tokens: int | None = None  # prompt tokens found cached at first admission
    block_hashes: list[bytes] = field(default_factory=list)  # of full blocks, memoized
    num_registered_blocks: int = 0  # leading blocks of block_ids already in the prefix cache

    @property
    def all_token_ids(self) -> list[int]:
        """The token ids known on the host (an in-flight last token is not among them)."""
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """`all_token_ids[start:end]`, without building the whole list (a step asks each row
        for a few tokens of a sequence that may hold thousands)."""
        prompt = self.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        tail = self.output_token_ids[max(start - len(prompt), 0) : end - len(prompt)]
        return prompt[start:] + tail if start < len(prompt) else tail

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_inflight_tokens

    @property
    def num_output_tokens(self) -> int:
        """Output tokens sampled so far, in flight included: the index of the next draw."""
        return len(self.output_token_ids) + self.num_inflight_tokens

    def reaches_length_limit(self, max_model_len: int) -> bool:
        """Whether the tokens sampled so far already end the request by length, so it needs
        no further step (known before an in-flight token's id is)."""
        return self.num_output_tokens >= self.params.max_tokens or self.num_tokens >= max_model_len

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def extra_keys(self) -> tuple:
        """Everything besides the tokens that changes a block's KV (see block_manager): the
        namespace, the adapter the request runs with (its KV differs from the base model's),
        and the salt."""
        return (self.lora_id, self.lora_int_id, self.cache_salt)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def finish(self, reason: str) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.num_inflight_tokens = 0  # whatever is still in flight is dropped

    def check_token_stop(self, max_model_len: int) -> str | None:
        """Stop by token (EOS, stop_token_ids) or by length, after a token was appended."""
        token = self.output_token_ids[-1]
        if not self.params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in self.params.stop_token_ids:
            return "stop"
        if len(self.output_token_ids) >= self.params.max_tokens:
            return "length"
        # Host-known tokens only: a token already in flight (overlap) was scheduled because it
        # fits, and ending the request here would drop it.
        if len(self.prompt_token_ids) + len(self.output_token_ids) >= max_model_len:
            return "length"
        return None


T = TypeVar("T")


class GrowingPrefix(Sequence[T]):
    """The first `len(items)` items of a list that only grows (a request's output tokens or
    logprobs), frozen at that length: what a step's output shows of it, made in O(1) where a
    copy per step would cost O(n) and a whole generation O(n^2). Compares equal to a list
    with the same items."""

    __slots__ = ("_items", "_length")

    def __init__(self, items: list[T]) -> None:
        self._items = items
        self._length = len(items)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):  # only the items asked for are copied
            start, stop, step = index.indices(self._length)
            if step > 0:
                return self._items[start:stop:step]
            return [self._items[i] for i in range(start, stop, step)]
        if not -self._length <= index < self._length:
            raise IndexError("output index out of range")
        return self._items[index % self._length]

    def __iter__(self):
        return iter(self._items[: self._length])

    def __eq__(self, other) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == self._length and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # mutable items: unhashable, like the list it stands for

    def __repr__(self) -> str:
        return repr(list(self))
