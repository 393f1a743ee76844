"""Incremental detokenization equals a full decode, token by token, with O(1) work per token."""

from __future__ import annotations

import json
import random

import pytest

from tesela.engine.detokenizer import IncrementalDetokenizer
from tesela.tokenizer import ByteTokenizer, HFTokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>"]
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "日本語のテキストと中文字符，混在しています。",
    "Emoji: 😀🎉👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, then café naïve façade.",
    "Ελληνικά και русский текст, עברית ו-العربية.",
    "  leading spaces, tabs\tand\nnewlines\n\n  ",
    "数学 ∑∫√∞ ≠ ≤ ≥ and 한국어 텍스트 🧑🏽‍💻",
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) trained on a small multilingual corpus, so
    emoji and CJK characters split into several byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TEXTS[:4] * 20, trainer=trainer)
    path = tmp_path_factory.mktemp("bpe")
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": SPECIALS[0]}))
    return HFTokenizer(path)


def stream(tokenizer, ids: list[int], **kwargs) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feed ids one at a time (as the engine does) and check the text never runs ahead of a
    full decode of the same tokens."""
    detokenizer = IncrementalDetokenizer(tokenizer, **kwargs)
    skip = kwargs.get("skip_special_tokens", True)
    deltas = []
    for n in range(1, len(ids) + 1):
        deltas.append(detokenizer.update(ids[:n]))
        full = tokenizer.decode(ids[:n], skip_special_tokens=skip)
        if detokenizer.stopped_by is None:
            assert full.startswith(detokenizer.text), (n, full, detokenizer.text)
            assert "\ufffd" not in detokenizer.text or "\ufffd" in full
    deltas.append(detokenizer.flush(ids))
    return detokenizer, deltas


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_bpe_stream_equals_full_decode(bpe, skip_special_tokens):
    for text in TEXTS:
        ids = bpe.encode(text)
        # Special tokens in the middle of the output, as chat models emit them.
        ids = ids[:5] + [bpe._tokenizer.token_to_id(SPECIALS[1])] + ids[5:]
        detokenizer, deltas = stream(bpe, ids, skip_special_tokens=skip_special_tokens)
        full = bpe.decode(ids, skip_special_tokens=skip_special_tokens)
        assert detokenizer.text == full
        assert "".join(deltas) == full
        assert (SPECIALS[1] in full) is not skip_special_tokens


def test_multibyte_characters_are_held_until_complete(bpe):
    ids = bpe.encode("😀")
    assert len(ids) > 1  # the emoji's 4 bytes are several tokens
    detokenizer, deltas = stream(bpe, ids)
    assert deltas[:-2] == [""] * (len(ids) - 1)  # nothing half-made is emitted
    assert detokenizer.text == "😀"


def test_random_token_sequences_match_full_decode(bpe):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(bpe.vocab_size) for _ in range(40)]
        detokenizer, deltas = stream(bpe, ids)
        assert detokenizer.text == bpe.decode(ids)
        assert "".join(deltas) == detokenizer.text


def test_byte_tokenizer_stream_equals_full_decode():
    tokenizer = ByteTokenizer()
    for text in TEXTS:
        ids = tokenizer.encode(text) + [ByteTokenizer.EOS]
        detokenizer, deltas = stream(tokenizer, ids)
        assert detokenizer.text == text
        assert "".join(deltas) == text


def test_incomplete_final_character_is_flushed():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("ab") + list("😀".encode())[:2]
    detokenizer = IncrementalDetokenizer(tokenizer)
    for n in range(1, len(ids) + 1):
        detokenizer.update(ids[:n])
    assert detokenizer.text == "ab"
    detokenizer.flush(ids)
    assert detokenizer.text == tokenizer.decode(ids) == "ab\ufffd"


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(bpe, include):
    text = "Hello, world! 日本語のテキスト and more text after it."
    ids, stop = bpe.encode(text), "d! 日本語"
    _, deltas = stream(bpe, ids)
    assert not any(stop in delta for delta in deltas)  # the stop string spans several steps
    detokenizer, _ = stream(bpe, ids, stop=("zzz", stop), include_stop_str_in_output=include)
    cut = text.index(stop) + (len(stop) if include else 0)
    assert detokenizer.stopped_by == stop
    assert detokenizer.text == text[:cut]


def test_stop_string_at_the_start_leaves_empty_text():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("\nrest")
    detokenizer, _ = stream(tokenizer, ids, stop=("\n",))
    assert detokenizer.stopped_by == "\n"
    assert detokenizer.text == ""


def test_work_per_token_is_constant(bpe):
    """Each step decodes a short window, not the whole output (O(1) per token)."""

    class Counting:
        def __init__(self, inner):
            self.inner, self.longest = inner, 0

        def decode(self, ids, skip_special_tokens=True):
            self.longest = max(self.longest, len(ids))
            return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

        def skips(self, token_id, skip_special_tokens=True):
            return self.inner.skips(token_id, skip_special_tokens)

    special = bpe.encode(SPECIALS[1])
    text = bpe.encode(" ".join(TEXTS) * 20)
    assert len(text) > 2000 and len(special) == 1
    # Long runs of skipped special tokens (no text at all: as random weights give), first and
    # inside a character (between its byte tokens).
    cut = next(k for k in range(50, 80) if bpe.decode(text[:k]).endswith("\ufffd"))
    for ids in (text, special * 500 + text[:cut] + special * 300 + text[cut:]):
        counting = Counting(bpe)
        detokenizer = IncrementalDetokenizer(counting)
        for n in range(1, len(ids) + 1):
            detokenizer.update(ids[:n])
        detokenizer.flush(ids)
        assert detokenizer.text == bpe.decode(ids)
        assert counting.longest <= 12


def test_engine_text_equals_a_full_decode_of_its_tokens():
    """Through the engine's step loop (tiny model, byte tokenizer: random bytes, often
    incomplete or invalid UTF-8), finished text equals a full decode; a stop string cuts it."""
    from tesela import LLM, SamplingParams

    llm = LLM("tiny", device="cpu")
    prompts = ["Hello", "日本語", "😀 emoji", "abc def"]
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=3, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    for output in outputs:
        assert output.text == llm.tokenizer.decode(output.token_ids)
    full = outputs[0].text
    stop = full[10:12]
    stopped = llm.generate(prompts[:1], SamplingParams(**{**vars(params), "stop": (stop,)}))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[: full.index(stop)]


def test_skipped_ids_are_exactly_what_decode_leaves_out(bpe):
    """`skips` names the ids a decode drops before decoding (the detokenizer leaves them out of
    its windows): the special tokens, and only while skip_special_tokens is on."""
    a, b = bpe.encode("ab"), bpe.encode(" c")
    skipped = [i for i in range(bpe.vocab_size) if bpe.skips(i)]
    assert sorted(skipped) == sorted(bpe.encode("".join(SPECIALS)))
    for i in skipped:
        assert bpe.decode(a + [i] + b) == bpe.decode(a + b)
        assert not bpe.skips(i, skip_special_tokens=False)
    assert all(ByteTokenizer().skips(i) for i in (256, 257, 151935))
    assert not any(ByteTokenizer().skips(i) for i in (0, 65, 255))
