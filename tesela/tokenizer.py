"""Tokenizers: HF tokenizer.json (through `tokenizers`) and the built-in byte-level tokenizer.

The chat template comes from `--chat-template` or tokenizer_config.json (rendered in jinja2's
immutable sandbox with the helpers transformers gives templates: a template from a third-party
repository is untrusted input); without one a plain "role: content" transcript is used.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    eos_token_ids: tuple[int, ...]
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def skips(self, token_id: int, skip_special_tokens: bool = True) -> bool:
        """Whether `decode` leaves the id out before decoding (so any window may drop it)."""
        ...

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> str: ...


def plain_chat_prompt(messages: list[dict], add_generation_prompt: bool = True) -> str:
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    if add_generation_prompt:
        lines.append("assistant:")
    return "\n".join(lines)


class ByteTokenizer:
    """UTF-8 bytes are tokens 0-255; 256 is BOS and 257 EOS. Needs no files."""

    BOS, EOS = 256, 257
    vocab_size = 258
    chat_template: str | None = None  # set by --chat-template; else a plain transcript

    def __init__(self) -> None:
        self.eos_token_ids = (self.EOS,)
        self.bos_token_id = self.BOS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        # BOS and EOS have no text, so they are skipped either way.
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")

    def skips(self, token_id: int, skip_special_tokens: bool = True) -> bool:
        return token_id >= 256

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template:
            return render_chat_template(self.chat_template, messages, add_generation_prompt)
        return plain_chat_prompt(messages, add_generation_prompt)


class HFTokenizer:
    """A tokenizer.json folder, with special tokens and chat template from tokenizer_config.json."""

    def __init__(self, path: str | Path, eos_token_ids: tuple[int, ...] = ()) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {path}: tesela reads HF fast tokenizers (tokenizer.json)"
            )
        self._tokenizer = RustTokenizer.from_file(str(file))
        config_file = path / "tokenizer_config.json"
        self.config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.chat_template = self.config.get("chat_template")
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        eos = set(eos_token_ids)
        if self.eos_token and self._tokenizer.token_to_id(self.eos_token) is not None:
            eos.add(self._tokenizer.token_to_id(self.eos_token))
        self.eos_token_ids = tuple(sorted(eos))
        # Special added tokens (older `tokenizers` lack the call: then no id is known as skipped,
        # which only costs the detokenizer its shortcut).
        added = getattr(self._tokenizer, "get_added_tokens_decoder", dict)()
        self.special_ids = frozenset(i for i, token in added.items() if token.special)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def skips(self, token_id: int, skip_special_tokens: bool = True) -> bool:
        # The fast tokenizer drops special added tokens by id, before its decoder runs.
        return skip_special_tokens and token_id in self.special_ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            return plain_chat_prompt(messages, add_generation_prompt)
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


class ChatTemplateError(ValueError):
    """A chat template failed to render (or refused the messages)."""


def render_chat_template(
    template: str, messages: list[dict], add_generation_prompt: bool = True, **special: str
) -> str:
    """Render an HF chat template in jinja2's immutable sandbox: no attribute walks to
    Python internals, no mutation of the messages. Any failure is a ChatTemplateError."""
    import jinja2

    try:
        compiled = _compile_template(template)
        special.setdefault("bos_token", "")
        special.setdefault("eos_token", "")
        return compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special
        )
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from None


@functools.lru_cache(maxsize=8)
def _compile_template(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    # The helpers transformers provides to chat templates.
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_template_error
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(template)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def load_chat_template(value: str) -> str:
    """`--chat-template`: a file holding a template, or the template text itself."""
    path = Path(value)
    if len(value) < 4096 and "{" not in value:
        if not path.is_file():
            raise FileNotFoundError(
                f"chat template file {value} does not exist: give a jinja file or the template text"
            )
        return path.read_text()
    return value


def _token_text(token) -> str | None:
    if isinstance(token, dict):  # {"content": "<s>", ...} in older configs
        return token.get("content")
    return token


def _raise_template_error(message: str):
    raise ChatTemplateError(f"the chat template refused the messages: {message}")


def load_tokenizer(path: str | Path | None, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
    if path is None:
        return ByteTokenizer()
    return HFTokenizer(path, eos_token_ids)
