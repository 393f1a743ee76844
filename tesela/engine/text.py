"""An output's text as it grows, without a copy of the whole text per token.

A request's text grows by a few characters a step. Kept as one `str`, every step would copy all
of it (`text += piece` on an attribute, `text[:keep] + tail`, a slice to hold back the end):
O(length) per token, O(length^2) per request, milliseconds a step at a few hundred long
streams. Here the text is a `TextBuffer` of pieces, appended in O(piece), and what a step shows
of it is a `TextSnapshot` (the buffer frozen at its length, made in O(1)): the whole text is
joined only when someone reads it as a `str`, and the parts a stream needs (the characters
since what it sent, the last few characters) are sliced from the pieces in O(what is sliced).

A buffer only grows; cutting it (a stop string found across pieces already shown) makes a new
buffer with the kept prefix, so every snapshot keeps the text it was taken of. One thread may
append while others read snapshots (the in-process server's engine thread and its event loop):
a piece is in the list before its end offset, and nothing is ever rewritten.

Imports no torch.
"""

from __future__ import annotations

import bisect
import os


class TextBuffer:
    """Text appended piece by piece; see the module docstring."""

    __slots__ = ("_pieces", "_ends", "_length")

    def __init__(self, text: str = "") -> None:
        self._pieces: list[str] = []
        self._ends: list[int] = []  # the end offset of each piece
        self._length = 0
        self.append(text)

    def __len__(self) -> int:
        return self._length

    def append(self, piece: str) -> None:
        if piece:
            self._pieces.append(piece)
            self._length += len(piece)
            self._ends.append(self._length)

    def slice(self, start: int, end: int) -> str:
        """Characters [start, end) (0 <= start <= end <= len), reading only the pieces that
        hold them."""
        if start >= end:
            return ""
        first = bisect.bisect_right(self._ends, start)
        last = bisect.bisect_left(self._ends, end)
        if first == last:  # within one piece
            offset = self._ends[first] - len(self._pieces[first])
            return self._pieces[first][start - offset : end - offset]
        parts = self._pieces[first : last + 1]
        head = self._ends[first] - len(parts[0])
        tail = self._ends[last] - end
        text = "".join(parts)
        return text[start - head : len(text) - tail]

    def cut(self, keep: int) -> TextBuffer:
        """A new buffer holding the first `keep` characters (this one, and its snapshots, keep
        theirs)."""
        return TextBuffer(self.slice(0, keep))

    def snapshot(self) -> TextSnapshot:
        return TextSnapshot(self, self._length)


class TextSnapshot:
    """A buffer's text as of one step: its first `length` characters. Read as a str
    (`str(snapshot)`, joined once and kept), or in parts without the rest."""

    __slots__ = ("buffer", "length", "_text")

    def __init__(self, buffer: TextBuffer, length: int) -> None:
        self.buffer = buffer
        self.length = length
        self._text: str | None = None

    def __len__(self) -> int:
        return self.length

    def __str__(self) -> str:
        if self._text is None:
            self._text = self.buffer.slice(0, self.length)
        return self._text

    def slice(self, start: int, end: int | None = None) -> str:
        end = self.length if end is None else min(end, self.length)
        if self._text is not None:
            return self._text[start:end]
        return self.buffer.slice(max(start, 0), end)

    def common_prefix(self, other: TextSnapshot | None) -> int:
        """How many leading characters this text shares with `other` (None: none): in O(1) for
        two snapshots of one buffer, which only grows; by comparison otherwise (a buffer cut at
        a stop string: once per request)."""
        if other is None:
            return 0
        if other.buffer is self.buffer:
            return min(self.length, other.length)
        return len(os.path.commonprefix([str(self), str(other)]))


def as_snapshot(text: str | TextSnapshot) -> TextSnapshot:
    """A str as a snapshot of a buffer of its own (for outputs made from a whole text)."""
    if isinstance(text, TextSnapshot):
        return text
    snapshot = TextBuffer(text).snapshot()
    snapshot._text = text
    return snapshot
