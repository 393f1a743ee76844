"""The output text as pieces (tesela/engine/text.py): slices equal the joined text's, snapshots
keep their text, and a long stream copies O(length) characters in all, not O(length^2)."""

from __future__ import annotations

import random

import pytest

from tesela.engine.detokenizer import IncrementalDetokenizer
from tesela.engine.llm_engine import RequestOutput
from tesela.engine.text import TextBuffer, as_snapshot
from tesela.server.serving import ChoiceStream
from tesela.tokenizer import ByteTokenizer


def test_slices_equal_the_joined_text_across_pieces():
    rng = random.Random(0)
    alphabet = "ab€😀"
    for _ in range(50):
        buffer, whole = TextBuffer(), ""
        for _ in range(rng.randrange(1, 12)):
            piece = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 5)))
            buffer.append(piece)
            whole += piece
        assert len(buffer) == len(whole)
        for _ in range(20):
            start = rng.randrange(0, len(whole) + 1)
            end = rng.randrange(start, len(whole) + 1)
            assert buffer.slice(start, end) == whole[start:end]
        assert str(buffer.snapshot()) == whole


def test_a_snapshot_keeps_its_text_when_the_buffer_grows_or_is_cut():
    buffer = TextBuffer("hello")
    early = buffer.snapshot()
    buffer.append(" world")
    late = buffer.snapshot()
    cut = buffer.cut(3)
    cut.append("p!")
    assert str(early) == "hello" and str(late) == "hello world"
    assert str(cut.snapshot()) == "help!"
    assert late.slice(6) == "world" and early.slice(2, 9) == "llo"
    # One buffer: the shared prefix is the shorter length; across a cut it is compared.
    assert late.common_prefix(early) == 5 and early.common_prefix(None) == 0
    assert cut.snapshot().common_prefix(late) == 3


def test_an_output_reads_its_text_as_a_str_from_either_kind():
    buffer = TextBuffer("abc")
    output = RequestOutput("r", [1], [], buffer.snapshot())
    buffer.append("def")
    assert output.text == "abc" and len(output.text_snapshot) == 3
    assert output == RequestOutput("r", [1], [], "abc")
    output.text = "xyz"
    assert output.text_snapshot.slice(1) == "yz"
    with pytest.raises(TypeError, match="needs its text"):
        RequestOutput("r", [1], [])


class CountingBuffer(TextBuffer):
    """The real buffer, counting the characters its slices copy."""

    copied = 0

    def slice(self, start: int, end: int) -> str:
        text = super().slice(start, end)
        CountingBuffer.copied += len(text)
        return text

    def cut(self, keep: int) -> TextBuffer:
        return CountingBuffer(self.slice(0, keep))


def test_a_long_stream_copies_its_text_a_bounded_number_of_times():
    """Detokenizer -> engine-core delta -> frontend buffer -> SSE chunk, 20,000 tokens: the
    characters copied stay a small multiple of the text (a whole-text copy per token would be
    ~2 x 10^8 of them)."""
    tokenizer = ByteTokenizer()
    ids = list(("Streaming text, é and 😀. " * 800).encode())[:20_000]
    detokenizer = IncrementalDetokenizer(tokenizer, stop=("STOP!",))
    detokenizer._text = CountingBuffer()
    frontend = as_snapshot(CountingBuffer().snapshot())
    sent, stream, chunks = None, ChoiceStream(holdback=len("STOP!") - 1), []
    CountingBuffer.copied = 0
    for n in range(1, len(ids) + 1):
        detokenizer.update(ids[:n])
        text = detokenizer.snapshot()
        keep = text.common_prefix(sent)  # what EngineCore._delta sends: (keep, new text)
        tail, sent = text.slice(keep), text
        buffer = frontend.buffer if keep == len(frontend) else frontend.buffer.cut(keep)
        buffer.append(tail)  # what CoreClient._deliver does with it
        frontend = buffer.snapshot()
        output = RequestOutput("r", [1], ids[:n], frontend, finished=n == len(ids))
        chunks.append(stream.advance(output)[0])
    full = tokenizer.decode(ids)
    assert "".join(chunks) == full and detokenizer.text == full
    assert CountingBuffer.copied < 8 * len(full)
