"""What a scripted model answers, and how it becomes Chat Completions wire data.

`Reply` is one streamed answer (text and/or tool calls); `HttpError` is an error status; a
`Responder` is a callable that looks at the request body and returns either. The chunk dicts
built here are exactly what OpenAI streams as `data: {...}` lines.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias


@dataclass(frozen=True, slots=True)
class Call:
    """One tool call the scripted model makes; its arguments are streamed in `pieces` chunks."""

    name: str
    arguments: str | Mapping[str, Any] = "{}"
    """A dict is JSON-encoded; a string is sent verbatim (use it for invalid JSON)."""
    id: str | None = None
    """Defaults to `call_<request#>_<index>`."""
    pieces: int = 3

    @property
    def argument_text(self) -> str:
        return self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments)


@dataclass(frozen=True, slots=True)
class Reply:
    """One streamed model answer."""

    text: str | Sequence[str] = ""
    """A string is cut into `chunk_size` pieces; a sequence gives the pieces explicitly."""
    tool_calls: Sequence[Call] = ()
    chunk_size: int = 8
    delay: float = 0.0
    """Seconds to wait before each chunk after the first (slow tokens)."""
    usage: tuple[int, int] | tuple[int, int, int, int] | None = None
    """(prompt_tokens, completion_tokens[, cached_tokens, reasoning_tokens]): sent as the final
    usage chunk when the request asks for usage. None sends no usage chunk (as some
    OpenAI-compatible servers do) unless the server counts usage itself (`auto_usage`)."""
    reasoning: str | None = None
    """Responses API: a reasoning item first, with this summary and an encrypted_content blob."""
    raw: Sequence[str] | None = None
    """Chat Completions: these `data:` payloads verbatim instead of the reply's chunks (bad servers)."""
    done: bool = True
    """Chat Completions: end with `data: [DONE]` (some servers just close the body)."""
    break_after: int | None = None
    """Stop after this many chunks (the first is the role chunk), without `[DONE]`."""
    drop: Literal["abort", "eof"] = "abort"
    """How `break_after` stops: `abort` drops the connection mid-body (the client sees a
    connection error); `eof` ends the HTTP body cleanly, so the stream just stops early."""
    finish_reason: str | None = None
    """Defaults to `tool_calls` when there are tool calls, else `stop`."""


@dataclass(frozen=True, slots=True)
class HttpError:
    """An error status with OpenAI's JSON error body."""

    status: int = 500
    message: str = "scripted server error"
    retry_after: float | None = None
    """Sent as the `retry-after` header (seconds) when set."""
    headers: Mapping[str, str] = field(default_factory=dict)
    code: str | None = None
    param: str | None = None


Answer: TypeAlias = Reply | HttpError
Responder: TypeAlias = Callable[[dict[str, Any]], Answer | Awaitable[Answer]]
"""Called with the parsed request body; returns (or awaits to) the answer."""
Scripted: TypeAlias = Reply | HttpError | Responder


def text_pieces(reply: Reply) -> list[str]:
    """The content pieces the reply streams."""
    if not isinstance(reply.text, str):
        return list(reply.text)
    size = max(1, reply.chunk_size)
    return [reply.text[i : i + size] for i in range(0, len(reply.text), size)]


def split_evenly(text: str, pieces: int) -> list[str]:
    """`text` cut into `pieces` parts (fewer when it is shorter); at least one part."""
    if not text:
        return [""]
    size = max(1, -(-len(text) // max(1, pieces)))
    return [text[i : i + size] for i in range(0, len(text), size)]


class ChunkFactory:
    """Builds `chat.completion.chunk` dicts for one response."""

    def __init__(self, request_no: int, model: str) -> None:
        self.request_no = request_no
        self.base = {
            "id": f"chatcmpl-scripted-{request_no}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_scripted",
        }

    def delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self.base, "choices": [choice]}

    def usage(self, prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0},
        }
        return {**self.base, "choices": [], "usage": usage}

    def call_id(self, call: Call, index: int) -> str:
        return call.id or f"call_{self.request_no}_{index}"


def reply_chunks(reply: Reply, *, request_no: int, model: str, include_usage: bool) -> list[dict[str, Any]]:
    """Every chunk of `reply` in stream order, as OpenAI sends them."""
    make = ChunkFactory(request_no, model)
    chunks = [make.delta({"role": "assistant", "content": ""})]
    chunks += [make.delta({"content": piece}) for piece in text_pieces(reply)]
    for index, call in enumerate(reply.tool_calls):
        for n, piece in enumerate(split_evenly(call.argument_text, call.pieces)):
            entry: dict[str, Any] = {"index": index, "function": {"arguments": piece}}
            if n == 0:
                entry.update(id=make.call_id(call, index), type="function")
                entry["function"] = {"name": call.name, "arguments": piece}
            chunks.append(make.delta({"tool_calls": [entry]}))
    finish = reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")
    chunks.append(make.delta({}, finish))
    if include_usage and reply.usage is not None:
        chunks.append(make.usage(*reply.usage))
    return chunks


def reply_completion(reply: Reply, *, request_no: int, model: str) -> dict[str, Any]:
    """The same answer as one non-streamed `chat.completion` body."""
    make = ChunkFactory(request_no, model)
    text = "".join(text_pieces(reply))
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": make.call_id(c, i),
                "type": "function",
                "function": {"name": c.name, "arguments": c.argument_text},
            }
            for i, c in enumerate(reply.tool_calls)
        ]
    finish = reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")
    body = {
        **make.base,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
    }
    if reply.usage is not None:
        body["usage"] = make.usage(*reply.usage)["usage"]
    return body


def error_body(error: HttpError) -> dict[str, Any]:
    kind = (
        "rate_limit_error"
        if error.status == 429
        else "server_error"
        if error.status >= 500
        else "invalid_request_error"
    )
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}


def context_exceeded(limit: int, tokens: int) -> HttpError:
    """What OpenAI answers for a prompt past the model's window."""
    message = (
        f"This model's maximum context length is {limit} tokens. However, your messages resulted in "
        f"{tokens} tokens. Please reduce the length of the messages."
    )
    return HttpError(400, message, code="context_length_exceeded", param="messages")


def unsupported_parameter(name: str) -> HttpError:
    """What OpenAI answers for a parameter the model does not take."""
    message = f"Unsupported parameter: '{name}' is not supported with this model."
    return HttpError(400, message, code="unsupported_parameter", param=name)
