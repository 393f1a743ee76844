"""From a RequestGroup's outputs to OpenAI responses: whole JSON bodies or SSE chunk streams.

The engine reports each choice cumulatively (all tokens, all text so far: a snapshot of the
text, read in parts, tesela/engine/text.py); `ChoiceStream` turns that into deltas that never have to be taken back: text that may still change (an
incomplete UTF-8 sequence decoded as U+FFFD, or the start of a stop string the engine would
cut) is held back until it is settled or the choice finishes. So the concatenated stream is
exactly the non-streamed text.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

from tesela.engine.llm_engine import RequestOutput
from tesela.engine.request import TokenLogprobs
from tesela.engine.text import TextSnapshot
from tesela.server.async_engine import EngineError, RequestGroup, ShuttingDown
from tesela.server.protocol import (
    APIError,
    GenerationRequest,
    chat_logprobs,
    completion_logprobs,
    usage,
)

logger = logging.getLogger("tesela.server")

REPLACEMENT_CHAR = "\ufffd"


class TokenText:
    """Token id -> its text alone, cached (logprobs name every token they list)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id])
        return text


class ChoiceStream:
    """What one choice has sent so far, and what the next chunk adds. Reads the output's text
    as a snapshot: a chunk costs its new characters, not a copy of the whole text."""

    def __init__(self, holdback: int) -> None:
        self.holdback = holdback  # longest stop string - 1
        self.sent: TextSnapshot | None = None  # the text the last chunk was cut from
        self.sent_len = 0  # characters sent so far: the first sent_len of `sent`
        self.num_tokens = 0
        self.text_offset = 0  # for legacy logprobs offsets across chunks
        self.finish_reason: str | None = None
        self.num_cached_tokens = 0

    @property
    def text(self) -> str:
        """The text sent so far."""
        return self.sent.slice(0, self.sent_len) if self.sent is not None else ""

    def advance(self, output: RequestOutput) -> tuple[str, list[TokenLogprobs] | None, bool]:
        """(text delta, logprobs of the new tokens, whether anything new happened)."""
        logprobs = output.logprobs[self.num_tokens :] if output.logprobs is not None else None
        new_tokens = len(output.token_ids) > self.num_tokens
        self.num_tokens = len(output.token_ids)
        self.num_cached_tokens = output.num_cached_tokens
        text = output.text_snapshot
        end = len(text) if output.finished else self._settled_end(text)
        delta = ""
        if text.common_prefix(self.sent) >= self.sent_len and end >= self.sent_len:
            delta = text.slice(self.sent_len, end)
            self.sent = text  # its first sent_len characters are those sent
        elif output.finished:  # earlier text changed after it was sent: cannot take it back
            logger.warning("streamed text diverged from the final text of %s", output.request_id)
            delta = text.slice(self.sent_len, end)
        self.sent_len += len(delta)
        if output.finished:
            self.finish_reason = output.finish_reason
        return delta, logprobs, bool(delta) or new_tokens or output.finished

    def _settled_end(self, text: TextSnapshot) -> int:
        """Where the text that can no longer change ends: short of the last `holdback`
        characters (a stop string may still begin there) and of trailing U+FFFD."""
        end = len(text) - self.holdback
        while end > self.sent_len and text.slice(end - 1, end) == REPLACEMENT_CHAR:
            end -= 1
        return max(end, 0)


class ResponseFormat:
    """The shared shape of completion and chat responses; subclasses fill in choices."""

    object_name = ""
    chunk_object_name = ""

    def __init__(self, request: GenerationRequest, request_id: str, token_text: TokenText):
        self.request = request
        self.request_id = request_id
        self.created = int(time.time())
        self.token_text = token_text

    def envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {
            "id": self.request_id,
            "object": object_name,
            "created": self.created,
            "model": self.request.model,
            "choices": choices,
        }

    def response(self, outputs: dict[int, RequestOutput]) -> dict:
        choices = [self.final_choice(i, outputs[i]) for i in sorted(outputs)]
        body = self.envelope(self.object_name, choices)
        completion_tokens = sum(len(o.token_ids) for o in outputs.values())
        cached = self.cached_tokens({i: o.num_cached_tokens for i, o in outputs.items()})
        body["usage"] = usage(self.request.num_prompt_tokens, completion_tokens, cached)
        return body

    def usage_chunk(self, completion_tokens: int, cached_tokens: int) -> dict:
        body = self.envelope(self.chunk_object_name, [])
        body["usage"] = usage(self.request.num_prompt_tokens, completion_tokens, cached_tokens)
        return body

    def cached_tokens(self, by_choice: dict[int, int]) -> int:
        """Cached prompt tokens, counted once per prompt like `prompt_tokens` (the first choice
        of each prompt tells; its other choices share the same prompt)."""
        per_prompt: dict[int, int] = {}
        for choice in sorted(by_choice):
            per_prompt.setdefault(self.request.choice_prompts[choice], by_choice[choice])
        return sum(per_prompt.values())

    def start_chunks(self) -> list[dict]:
        return []

    def final_choice(self, index: int, output: RequestOutput) -> dict:
        raise NotImplementedError

    def chunk(self, index: int, delta: str, logprobs, state: ChoiceStream) -> dict:
        raise NotImplementedError


class CompletionFormat(ResponseFormat):
    object_name = chunk_object_name = "text_completion"

    def final_choice(self, index: int, output: RequestOutput) -> dict:
        entries = output.logprobs
        text = output.text
        if self.request.echo:
            # The prompt leads: its text, and its tokens' logprobs (none for the first).
            prompt = output.prompt_token_ids
            text = self.token_text.tokenizer.decode(prompt) + text
            if entries is not None:
                first = TokenLogprobs(prompt[0], None, None)
                entries = [first, *output.prompt_logprobs[1:], *entries]
        logprobs = None
        if entries is not None:
            logprobs = completion_logprobs(entries, self.token_text)
        return {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": output.finish_reason,
        }

    def chunk(self, index: int, delta: str, logprobs, state: ChoiceStream) -> dict:
        formatted = None
        if logprobs is not None:
            formatted = completion_logprobs(logprobs, self.token_text, state.text_offset)
            state.text_offset += sum(len(t) for t in formatted["tokens"])
        choice = {
            "index": index,
            "text": delta,
            "logprobs": formatted,
            "finish_reason": state.finish_reason,
        }
        return self.envelope(self.chunk_object_name, [choice])


class ChatFormat(ResponseFormat):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def final_choice(self, index: int, output: RequestOutput) -> dict:
        logprobs = None
        if output.logprobs is not None:
            logprobs = chat_logprobs(output.logprobs, self.token_text)
        return {
            "index": index,
            "message": {"role": "assistant", "content": output.text},
            "logprobs": logprobs,
            "finish_reason": output.finish_reason,
        }

    def start_chunks(self) -> list[dict]:
        return [
            self.envelope(
                self.chunk_object_name, [_chat_choice(i, {"role": "assistant", "content": ""})]
            )
            for i in range(len(self.request.choice_params))
        ]

    def chunk(self, index: int, delta: str, logprobs, state: ChoiceStream) -> dict:
        formatted = chat_logprobs(logprobs, self.token_text) if logprobs is not None else None
        content = {"content": delta} if delta or state.finish_reason is None else {}
        choice = _chat_choice(index, content, formatted, state.finish_reason)
        return self.envelope(self.chunk_object_name, [choice])


def _chat_choice(index: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def make_format(request: GenerationRequest, request_id: str, token_text: TokenText):
    cls = ChatFormat if request.kind == "chat" else CompletionFormat
    return cls(request, request_id, token_text)


# ---- whole responses and streams ------------------------------------------------------------


async def collect(group: RequestGroup) -> dict[int, RequestOutput]:
    """Wait for every choice to finish; {choice index: final output}."""
    final: dict[int, RequestOutput] = {}
    async for latest in group.outputs():
        final.update(latest)
    return final


# One encoder for every chunk: json.dumps with options builds a new encoder per call.
_JSON = json.JSONEncoder(ensure_ascii=False)


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else _JSON.encode(payload)
    return f"data: {data}\n\n"


async def stream_events(group: RequestGroup, fmt: ResponseFormat) -> AsyncIterator[str]:
    """SSE events for one request; aborting the group if the client goes away (the
    response task is cancelled then, which runs the `finally`)."""
    request = fmt.request
    holdback = max((len(s) for p in request.choice_params for s in p.stop), default=1) - 1
    states = [ChoiceStream(holdback) for _ in request.choice_params]
    try:
        for chunk in fmt.start_chunks():
            yield sse(chunk)
        async for latest in group.outputs():
            events = []
            for index in sorted(latest):
                state = states[index]
                delta, logprobs, changed = state.advance(latest[index])
                if changed:
                    events.append(sse(fmt.chunk(index, delta, logprobs, state)))
            if events:
                yield "".join(events)
        if request.include_usage:
            cached = fmt.cached_tokens({i: s.num_cached_tokens for i, s in enumerate(states)})
            yield sse(fmt.usage_chunk(sum(s.num_tokens for s in states), cached))
    except EngineError as exc:
        # The status line is already sent: report the error in-band, as OpenAI does.
        code = "shutting_down" if isinstance(exc, ShuttingDown) else "engine_error"
        yield sse(APIError(str(exc), 500, type="server_error", code=code).body())
    finally:
        group.abort()
    yield sse("[DONE]")
