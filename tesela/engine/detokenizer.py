"""Incremental detokenization: each new token's text in O(1), and stop strings found as it grows.

Decoding a request's whole output every step costs O(length) per token, O(length^2) per
request. Instead each request keeps two offsets into its output ids, as vLLM and SGLang do:
`read_offset` (everything before it has been emitted as text) and `prefix_offset` (a few
tokens of already-emitted context before it). Each step decodes only the short window
ids[prefix_offset:] and emits what it adds beyond ids[prefix_offset:read_offset]. The context
matters for tokenizers whose decoder treats the first token of a decode specially (SentencePiece
drops a leading space there): mid-stream that token is never first in the window.

Ids that the decode leaves out (special tokens under `skip_special_tokens`, per the tokenizer's
`skips`) never enter the windows: they change no text, and a long run of them (random weights
emit little else) would otherwise keep the offsets still and grow the window with every token.

The text itself is a `TextBuffer` (tesela/engine/text.py): each step appends its piece in
O(piece) and shows a snapshot in O(1); nothing copies the whole text until someone reads it.

A window whose text ends in U+FFFD is an incomplete UTF-8 sequence (half of an emoji's bytes,
say): nothing is emitted until the character completes, so emitted text is never taken back and
the text at the end equals a full decode of the output. A window can only end in an incomplete
character for a few tokens (a character is at most 4 bytes); past `MAX_PENDING_TOKENS` the
replacement characters are real (invalid bytes) and are emitted as they are.

Imports no torch.
"""

from __future__ import annotations

from typing import Protocol

from tesela.engine.text import TextBuffer, TextSnapshot

REPLACEMENT_CHAR = "\ufffd"
MAX_PENDING_TOKENS = 8


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...

    # Optional: `skips(token_id, skip_special_tokens) -> bool`, ids `decode` leaves out.


class IncrementalDetokenizer:
    """The text of one request's output, extended token by token; cut at a stop string."""

    def __init__(
        self,
        tokenizer: Decoder,
        *,
        skip_special_tokens: bool = True,
        stop: tuple[str, ...] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop_str_in_output = include_stop_str_in_output
        self._text = TextBuffer()
        self.stopped_by: str | None = None  # the stop string that ended the text, if any
        self.num_tokens = 0  # output tokens seen
        self.prefix_offset = 0  # offsets into `ids`
        self.read_offset = 0
        self.ids: list[int] = []  # the output ids that decode to text (the skipped left out)
        self._skips = getattr(tokenizer, "skips", None)
        self._max_stop_len = max((len(s) for s in stop), default=0)

    @property
    def text(self) -> str:
        """The whole text so far, as one str (joined now: an O(length) read)."""
        return str(self.snapshot())

    def snapshot(self) -> TextSnapshot:
        """The text so far, frozen, in O(1)."""
        return self._text.snapshot()

    def update(self, output_token_ids: list[int]) -> str:
        """Take the output ids (all of them; only the new ones are read) and return the text
        they add. After a stop string matched, nothing more is added."""
        if self.stopped_by is not None:
            return ""
        self._take(output_token_ids)
        return self._append(self._advance(self.ids, flush=False))

    def flush(self, output_token_ids: list[int]) -> str:
        """The request finished: emit what was held back (an incomplete final character)."""
        if self.stopped_by is not None:
            return ""
        self._take(output_token_ids)
        return self._append(self._advance(self.ids, flush=True))

    def _take(self, output_token_ids: list[int]) -> None:
        new = output_token_ids[self.num_tokens :]
        self.num_tokens = len(output_token_ids)
        if self._skips is None:
            self.ids.extend(new)
        else:
            skip = self.skip_special_tokens
            self.ids.extend(t for t in new if not self._skips(t, skip))

    def _advance(self, ids: list[int], flush: bool) -> str:
        if self.read_offset >= len(ids):
            return ""
        prefix_text = self._decode(ids[self.prefix_offset : self.read_offset])
        window_text = self._decode(ids[self.prefix_offset :])
        pending = len(ids) - self.read_offset
        incomplete = window_text.endswith(REPLACEMENT_CHAR) and pending <= MAX_PENDING_TOKENS
        if len(window_text) <= len(prefix_text) and not flush:
            return ""  # e.g. only special tokens so far, which decode to nothing
        if incomplete and not flush:
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return window_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _append(self, new_text: str) -> str:
        if not new_text:
            return ""
        if self.stop:
            new_text = self._cut_at_stop(new_text)
        self._text.append(new_text)
        return new_text

    def _cut_at_stop(self, new_text: str) -> str:
        """The part of `new_text` that stays: up to the first stop string (included if asked),
        which may begin in the text before it (then that text is cut too)."""
        start = len(self._text)
        # A stop string may span the old text and the new: search from max_len - 1 chars back.
        back = min(start, self._max_stop_len - 1)
        window = self._text.slice(start - back, start) + new_text
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = window.find(stop)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return new_text
        index, stop = best
        keep = start - back + (index + len(stop) if self.include_stop_str_in_output else index)
        self.stopped_by = stop
        if keep < start:  # the stop string began in text already shown
            self._text = self._text.cut(keep)
            return ""
        return new_text[: keep - start]
