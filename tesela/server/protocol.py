"""The OpenAI wire format: request validation into SamplingParams, and response builders.

Validation is explicit (no pydantic) so that every error names the field, says what was wrong
and what to send instead, and comes back as an OpenAI error body
({"error": {"message", "type", "param", "code"}}) with a 4xx status through `APIError`.
Fields OpenAI defines but tesela cannot honour (suffix, tools, ...) are refused with a
message naming the field rather than silently ignored; unknown fields are ignored, as vLLM does.

Parsing runs on a worker thread (it tokenizes and renders templates), and is bounded per
request: a string longer than the context could ever hold is refused before it is tokenized,
and one request may ask for at most `max_seqs_per_request` sequences (prompts x n).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from tesela.engine.request import TokenLogprobs
from tesela.engine.sampling_params import SamplingParams
from tesela.tokenizer import ChatTemplateError

MAX_N = 128
MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
# No tokenizer we know has tokens longer than this many characters: a text longer than
# max_model_len x this cannot fit the context, so it is refused without tokenizing it.
MAX_CHARS_PER_TOKEN = 128
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
_MISSING = object()


class APIError(Exception):
    """An error the client caused (or must retry), with its HTTP status and OpenAI body."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about the served model."""

    name: str  # the id reported by /v1/models and in responses
    aliases: tuple[str, ...]  # other accepted spellings (the folder path, its basename)
    max_model_len: int
    vocab_size: int
    tokenizer: Any
    # LoRA adapters served on top, by name (shared with the server, which adds and removes).
    adapters: dict[str, Any] = field(default_factory=dict)
    # Defaults for fields a request leaves out (from generation_config.json).
    sampling_defaults: dict = field(default_factory=dict)
    max_seqs_per_request: int = 256  # prompts x n of one request

    def accepts(self, name: str) -> bool:
        return name == self.name or name in self.aliases or name in self.adapters

    @property
    def max_prompt_chars(self) -> int:
        return self.max_model_len * MAX_CHARS_PER_TOKEN

    def encode(self, text: str, param: str) -> list[int]:
        """Tokenize client text: too long to ever fit, or not valid Unicode, is a 400."""
        if len(text) > self.max_prompt_chars:
            raise APIError(
                f"'{param}' has {len(text)} characters, more than a {self.max_model_len}-token "
                "context can hold: shorten it",
                param=param,
                code="context_length_exceeded",
            )
        try:
            return self.tokenizer.encode(text)
        except UnicodeEncodeError:
            raise APIError(
                f"'{param}' is not valid Unicode (it holds a lone surrogate such as \\ud800): "
                "send text that encodes as UTF-8",
                param=param,
                code="invalid_value",
            ) from None


@dataclass(frozen=True)
class GenerationRequest:
    """A validated completion or chat request: one SamplingParams per choice."""

    kind: str  # "completion" | "chat"
    model: str
    prompts: list[list[int]]  # token ids, one entry per prompt
    choice_prompts: list[int]  # choice index -> prompt index
    choice_params: list[SamplingParams]  # choice index -> its sampling params
    stream: bool
    include_usage: bool
    logprobs: int | None  # top alternatives per token; None: no logprobs
    echo: bool = False  # completions: the prompt (and its logprobs) lead each choice
    cache_salt: str | None = None  # shares cached prefixes only with requests of equal salt

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


# ---- JSON and field helpers -----------------------------------------------------------------


def parse_json_body(raw: bytes) -> dict:
    def reject_constant(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(
            f"the request body is not valid JSON ({str(exc)[:200]}): send a JSON object with "
            "Content-Type: application/json",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise APIError(
            "the request body nests arrays or objects too deeply: no OpenAI request needs that",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise APIError(
            f"the request body must be a JSON object, got {_json_type(body)}",
            code="invalid_json",
        )
    return body


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _wrong_type(name: str, expected: str, value: Any) -> APIError:
    return APIError(
        f"'{name}' must be {expected}, got {_json_type(value)} ({_preview(value)})",
        param=name,
        code="invalid_type",
    )


def _preview(value: Any) -> str:
    """At most 50 characters of a JSON value, safe for deep nesting and lone surrogates."""
    if isinstance(value, (list, dict)):
        return "[...]" if isinstance(value, list) else "{...}"
    return json.dumps(value)[:50]


def _get(body: dict, name: str, default: Any) -> Any:
    value = body.get(name, _MISSING)
    return default if value is _MISSING or value is None else value


def _int(body: dict, name: str, default: Any, low: int | None = None, high: int | None = None):
    value = _get(body, name, _MISSING)
    if value is _MISSING:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 16.0 is what some JSON encoders write for 16
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(name, "an integer", value)
    _check_range(name, value, low, high)
    return value


def _float(body: dict, name: str, default: float) -> float:
    value = _get(body, name, _MISSING)
    if value is _MISSING:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(name, "a number", value)
    return float(value)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = _get(body, name, default)
    if not isinstance(value, bool):
        raise _wrong_type(name, "true or false", value)
    return value


def _check_range(name: str, value: float, low: float | None, high: float | None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise APIError(f"'{name}' must be {bounds}, got {value}", param=name, code="invalid_value")


# ---- shared fields --------------------------------------------------------------------------


def check_model(body: dict, model: ModelInfo) -> str:
    name = body.get("model", _MISSING)
    if name is _MISSING or name is None:
        raise APIError(
            f"'model' is required: this server serves {model.name!r} (GET /v1/models lists it)",
            param="model",
            code="missing_field",
        )
    if not isinstance(name, str):
        raise _wrong_type("model", "a string", name)
    if not model.accepts(name):
        adapters = f" and adapters {sorted(model.adapters)}" if model.adapters else ""
        raise APIError(
            f"the model {name!r} does not exist here: this server serves {model.name!r}{adapters}",
            status=404,
            param="model",
            code="model_not_found",
        )
    return name if name in model.adapters else model.name


def _reject_unsupported(body: dict, names: tuple[str, ...]) -> None:
    """Refuse OpenAI fields with a non-default value that tesela does not implement."""
    for name in names:
        value = body.get(name)
        if value in (None, False, 0, "", [], {}):
            continue
        if name == "response_format" and value == {"type": "text"}:
            continue
        raise APIError(
            f"'{name}' is not supported by this server: leave it out (or at its default)",
            param=name,
            code="unsupported_parameter",
        )


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = _get(body, "stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _wrong_type("stop", "a string or an array of strings", stop)
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise APIError(
            f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings, got {len(stop)}",
            param="stop",
            code="invalid_value",
        )
    return tuple(stop)


def _token_id_list(body: dict, name: str, vocab_size: int) -> tuple[int, ...]:
    value = _get(body, name, [])
    if not isinstance(value, list) or not all(_is_int(t) for t in value):
        raise _wrong_type(name, "an array of integers", value)
    if any(not 0 <= t < vocab_size for t in value):
        raise APIError(
            f"'{name}' holds token ids outside the vocabulary [0, {vocab_size})",
            param=name,
            code="invalid_value",
        )
    return tuple(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _max_tokens(body: dict, name: str, prompt_len: int, model: ModelInfo, default: int | None):
    """The output budget, refused (not silently cut) when prompt + it exceeds the context."""
    room = model.max_model_len - prompt_len
    value = _int(body, name, None)
    if value is None:
        return max(1, min(default, room)) if default is not None else max(room, 1)
    if value < 1:
        raise APIError(
            f"'{name}' must be at least 1, got {value}", param=name, code="invalid_value"
        )
    if value > room:
        raise APIError(
            f"this model's context is {model.max_model_len} tokens, but {prompt_len} prompt "
            f"tokens + {name}={value} need {prompt_len + value}: ask for at most {room} tokens "
            "or shorten the prompt",
            param=name,
            code="context_length_exceeded",
        )
    return value


def _check_prompt_length(tokens: list[int], model: ModelInfo, param: str) -> None:
    if not tokens:
        raise APIError(f"'{param}' is empty: give at least one token of input", param=param)
    if len(tokens) >= model.max_model_len:
        raise APIError(
            f"the prompt has {len(tokens)} tokens, but this model's context is "
            f"{model.max_model_len} (and at least one token must be generated): shorten it",
            param=param,
            code="context_length_exceeded",
        )


def _seed(body: dict) -> int | None:
    return _int(body, "seed", None, low=-(2**63), high=2**64 - 1)


def _choice_seed(seed: int | None, index: int) -> int | None:
    # n > 1 with one seed must still give n different samples, reproducibly.
    if seed is None or index == 0:
        return seed
    return (seed + index) % 2**64


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream", False)
    options = _get(body, "stream_options", {})
    if not isinstance(options, dict):
        raise _wrong_type("stream_options", "an object", options)
    include_usage = _bool(options, "include_usage", False)
    return stream, include_usage


def _build(
    body: dict,
    kind: str,
    model_name: str,
    prompts: list[list[int]],
    model: ModelInfo,
    *,
    logprobs: int | None,
    max_tokens_name: str,
    default_max_tokens: int | None,
    echo: bool = False,
) -> GenerationRequest:
    n = _int(body, "n", 1, low=1, high=MAX_N)
    if n * len(prompts) > model.max_seqs_per_request:
        raise APIError(
            f"this request asks for {n * len(prompts)} sequences ({len(prompts)} prompt(s) x "
            f"n={n}), more than one request may run at once ({model.max_seqs_per_request}): "
            "lower n or split the prompts over several requests",
            param="n",
            code="too_many_sequences",
        )
    common = _sampling_fields(body, model, logprobs)
    if echo and logprobs is not None:
        common["prompt_logprobs"] = logprobs
    seed = _seed(body)
    stream, include_usage = _stream_flags(body)
    choice_prompts, choice_params = [], []
    for prompt_index, prompt in enumerate(prompts):
        max_tokens = _max_tokens(body, max_tokens_name, len(prompt), model, default_max_tokens)
        if common["min_tokens"] > max_tokens:
            raise APIError(
                f"'min_tokens' ({common['min_tokens']}) exceeds {max_tokens_name} ({max_tokens})",
                param="min_tokens",
                code="invalid_value",
            )
        for i in range(n):
            choice_prompts.append(prompt_index)
            choice_params.append(_params(max_tokens, _choice_seed(seed, i), common))
    return GenerationRequest(
        kind,
        model_name,
        prompts,
        choice_prompts,
        choice_params,
        stream,
        include_usage,
        logprobs,
        echo,
        _cache_salt(body),
    )


def _cache_salt(body: dict) -> str | None:
    """vLLM's `cache_salt`: a non-empty string that keeps a tenant's cached prefixes apart."""
    value = _get(body, "cache_salt", None)
    if value is not None and (not isinstance(value, str) or not value):
        raise _wrong_type("cache_salt", "a non-empty string", value)
    return value


def _sampling_fields(body: dict, model: ModelInfo, logprobs: int | None) -> dict:
    """The SamplingParams fields every choice shares (all but max_tokens and seed)."""
    defaults = model.sampling_defaults
    temperature = _float(body, "temperature", defaults.get("temperature", 1.0))
    if temperature < 0 or not math.isfinite(temperature):
        raise APIError(
            f"'temperature' must be >= 0 (0 is greedy), got {temperature}",
            param="temperature",
            code="invalid_value",
        )
    top_p = _float(body, "top_p", defaults.get("top_p", 1.0))
    if not 0.0 < top_p <= 1.0:
        raise APIError(
            f"'top_p' must be in (0, 1], got {top_p}", param="top_p", code="invalid_value"
        )
    return dict(
        temperature=temperature,
        top_p=top_p,
        top_k=_int(body, "top_k", defaults.get("top_k", -1), low=-1),
        min_p=_float_in(body, "min_p", defaults.get("min_p", 0.0), 0.0, 1.0),
        presence_penalty=_float_in(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_float_in(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_repetition_penalty(body, defaults.get("repetition_penalty", 1.0)),
        min_tokens=_int(body, "min_tokens", 0, low=0),
        logit_bias=_logit_bias(body, model.vocab_size),
        stop=_stop_strings(body),
        stop_token_ids=_token_id_list(body, "stop_token_ids", model.vocab_size),
        ignore_eos=_bool(body, "ignore_eos", False),
        include_stop_str_in_output=_bool(body, "include_stop_str_in_output", False),
        skip_special_tokens=_bool(body, "skip_special_tokens", True),
        logprobs=logprobs,
    )


def _float_in(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = _float(body, name, default)
    if not math.isfinite(value):
        raise APIError(f"'{name}' must be a finite number", param=name, code="invalid_value")
    _check_range(name, value, low, high)
    return value


def _repetition_penalty(body: dict, default: float) -> float:
    value = _float(body, "repetition_penalty", default)
    if not (math.isfinite(value) and value > 0):
        raise APIError(
            f"'repetition_penalty' must be > 0 (1 is off), got {value}",
            param="repetition_penalty",
            code="invalid_value",
        )
    return value


def _logit_bias(body: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """{"token id": bias in [-100, 100]}, as OpenAI sends it (keys are strings in JSON)."""
    value = _get(body, "logit_bias", {})
    if not isinstance(value, dict):
        raise _wrong_type("logit_bias", "an object of token id -> bias", value)
    if len(value) > MAX_LOGIT_BIAS:
        raise APIError(
            f"'logit_bias' takes at most {MAX_LOGIT_BIAS} entries, got {len(value)}",
            param="logit_bias",
            code="invalid_value",
        )
    entries = []
    for key, bias in value.items():
        if not (key.isdigit() and int(key) < vocab_size):
            raise APIError(
                f"'logit_bias' keys must be token ids in [0, {vocab_size}), got {key[:20]!r}",
                param="logit_bias",
                code="invalid_value",
            )
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise APIError(
                f"'logit_bias' values must be numbers in [-100, 100], got {_preview(bias)}",
                param="logit_bias",
                code="invalid_value",
            )
        entries.append((int(key), float(bias)))
    return tuple(entries)


def _params(max_tokens: int, seed: int | None, common: dict) -> SamplingParams:
    try:
        return SamplingParams(max_tokens=max_tokens, seed=seed, **common)
    except ValueError as exc:  # the engine's own check, as a backstop
        raise APIError(str(exc), code="invalid_value") from None


# ---- /v1/completions ------------------------------------------------------------------------

COMPLETION_UNSUPPORTED = ("suffix",)


def parse_completion(body: dict, model: ModelInfo) -> GenerationRequest:
    model_name = check_model(body, model)
    _reject_unsupported(body, COMPLETION_UNSUPPORTED)
    best_of = _int(body, "best_of", None)
    if best_of is not None and best_of != _int(body, "n", 1):
        raise APIError(
            "'best_of' other than n is not supported: leave it out",
            param="best_of",
            code="unsupported_parameter",
        )
    prompts = _completion_prompts(body, model)
    logprobs = _int(body, "logprobs", None, low=0, high=MAX_LOGPROBS)
    echo = _bool(body, "echo", False)
    if echo and _bool(body, "stream", False):
        raise APIError(
            "'echo' is not supported with 'stream': send the request without stream",
            param="echo",
            code="unsupported_parameter",
        )
    return _build(
        body,
        "completion",
        model_name,
        prompts,
        model,
        logprobs=logprobs,
        max_tokens_name="max_tokens",
        default_max_tokens=model.sampling_defaults.get("max_tokens", 16),
        echo=echo,
    )


def _completion_prompts(body: dict, model: ModelInfo) -> list[list[int]]:
    """A string, an array of strings, an array of token ids, or an array of those arrays."""
    prompt = body.get("prompt", _MISSING)
    if prompt is _MISSING or prompt is None:
        raise APIError(
            "'prompt' is required: a string, an array of strings or an array of token ids",
            param="prompt",
            code="missing_field",
        )
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    elif isinstance(prompt, list):
        raise APIError("'prompt' is an empty array: give at least one prompt", param="prompt")
    else:
        raise _wrong_type("prompt", "a string or an array", prompt)
    if len(prompts) > MAX_N:
        raise APIError(f"at most {MAX_N} prompts per request", param="prompt")
    return [_prompt_tokens(p, model) for p in prompts]


def _prompt_tokens(prompt: Any, model: ModelInfo) -> list[int]:
    if isinstance(prompt, str):
        tokens = model.encode(prompt, "prompt")
    elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        tokens = list(prompt)
        if any(not 0 <= t < model.vocab_size for t in tokens):
            raise APIError(
                f"'prompt' holds token ids outside the vocabulary [0, {model.vocab_size})",
                param="prompt",
                code="invalid_value",
            )
    else:
        raise _wrong_type("prompt", "a string or an array of integer token ids", prompt)
    _check_prompt_length(tokens, model, "prompt")
    return tokens


# ---- /v1/chat/completions -------------------------------------------------------------------

CHAT_UNSUPPORTED = (
    "tools",
    "functions",
    "tool_choice",
    "response_format",
    "audio",
    "prediction",
)


def parse_chat(body: dict, model: ModelInfo) -> GenerationRequest:
    model_name = check_model(body, model)
    _reject_unsupported(body, CHAT_UNSUPPORTED)
    tokens = chat_prompt_tokens(body, model)
    _check_prompt_length(tokens, model, "messages")
    logprobs = None
    if _bool(body, "logprobs", False):
        logprobs = _int(body, "top_logprobs", 0, low=0, high=MAX_LOGPROBS)
    elif _get(body, "top_logprobs", None) is not None:
        raise APIError(
            "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value"
        )
    max_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return _build(
        body,
        "chat",
        model_name,
        [tokens],
        model,
        logprobs=logprobs,
        max_tokens_name=max_name,
        default_max_tokens=model.sampling_defaults.get("max_tokens"),
    )


def chat_prompt_tokens(body: dict, model: ModelInfo) -> list[int]:
    """The messages through the (sandboxed) chat template, tokenized."""
    messages = _messages(body)
    add_generation_prompt = _bool(body, "add_generation_prompt", True)
    chars = sum(len(m["content"]) for m in messages)
    if chars > model.max_prompt_chars:
        raise APIError(
            f"'messages' hold {chars} characters, more than a {model.max_model_len}-token "
            "context can hold: shorten them",
            param="messages",
            code="context_length_exceeded",
        )
    try:
        text = model.tokenizer.apply_chat_template(messages, add_generation_prompt)
    except ChatTemplateError as exc:  # jinja errors, sandbox refusals, raise_exception()
        raise APIError(
            f"the chat template could not render these messages: {exc}", param="messages"
        ) from None
    return model.encode(text, "messages")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages", _MISSING)
    if messages is _MISSING or messages is None:
        raise APIError(
            "'messages' is required: an array of {'role': ..., 'content': ...} objects",
            param="messages",
            code="missing_field",
        )
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array of message objects", messages)
    if not messages:
        raise APIError(
            "'messages' is empty: give at least one message", param="messages", code="invalid_value"
        )
    return [_message(m, i) for i, m in enumerate(messages)]


def _message(message: Any, index: int) -> dict:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _wrong_type(param, "an object with 'role' and 'content'", message)
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise APIError(
            f"'{param}.role' must be one of {', '.join(CHAT_ROLES)}, got {json.dumps(role)}",
            param=f"{param}.role",
            code="invalid_value",
        )
    return {"role": role, "content": _content(message.get("content"), f"{param}.content")}


def _content(content: Any, param: str) -> str:
    """A string, null, or an array of text parts (images and audio are refused)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise _wrong_type(param, "a string or an array of text parts", content)
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise APIError(
                f"'{param}' may only hold text parts ({{'type': 'text', 'text': ...}}): "
                "this server serves a text-only model",
                param=param,
                code="unsupported_content",
            )
        if not isinstance(part.get("text"), str):
            raise _wrong_type(f"{param}.text", "a string", part.get("text"))
        texts.append(part["text"])
    return "".join(texts)


# ---- responses ------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage block; `cached_tokens`: prompt tokens served from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_logprobs(entries: list[TokenLogprobs], decode, text_offset: int = 0) -> dict:
    """The legacy completions format: parallel arrays per generated token."""
    tokens = [decode(e.token_id) for e in entries]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.top is None else _top_by_text(e.top, decode) for e in entries],
        "text_offset": offsets,
    }


def _top_by_text(top: dict[int, float], decode) -> dict[str, float]:
    # Distinct ids can share a text (e.g. partial UTF-8 bytes): keep the best logprob of each.
    by_text: dict[str, float] = {}
    for token_id, logprob in top.items():
        text = decode(token_id)
        by_text[text] = max(logprob, by_text.get(text, -math.inf))
    return by_text


def chat_logprobs(entries: list[TokenLogprobs], decode) -> dict:
    """The chat format: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def item(token_id: int, logprob: float) -> dict:
        token = decode(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    content = []
    for entry in entries:
        top = [item(t, lp) for t, lp in entry.top.items()]
        content.append({**item(entry.token_id, entry.logprob), "top_logprobs": top})
    return {"content": content}


# ---- /tokenize and /detokenize --------------------------------------------------------------


def _optional_model(body: dict, model: ModelInfo) -> None:
    if body.get("model") is not None:
        check_model(body, model)


def parse_tokenize(body: dict, model: ModelInfo) -> list[int]:
    """{"prompt": str} or {"messages": [...]} (through the chat template) -> token ids."""
    _optional_model(body, model)
    if body.get("messages") is not None:
        return chat_prompt_tokens(body, model)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise APIError(
            "'prompt' (a string) or 'messages' (an array) is required",
            param="prompt",
            code="missing_field",
        )
    return model.encode(prompt, "prompt")


def parse_detokenize(body: dict, model: ModelInfo) -> list[int]:
    _optional_model(body, model)
    if "tokens" not in body:
        raise APIError("'tokens' (an array of token ids) is required", param="tokens")
    return list(_token_id_list(body, "tokens", model.vocab_size))
