"""Assembling one streamed Chat Completions turn from its chunks, and summing token usage.

Chunks arrive as the plain JSON dicts the server sent (the client's SSE decoder, no model
classes): building a typed object per chunk was most of the loop's per-chunk CPU.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


class IncompleteStream(Exception):
    """The stream ended before the model finished its answer (no finish_reason)."""


class MalformedStream(Exception):
    """A chunk was not what the protocol allows (an error object, a non-object)."""


@dataclass(frozen=True, slots=True)
class TurnUsage:
    """What the server reported for one call."""

    prompt: int = 0
    completion: int = 0
    cached: int = 0
    reasoning: int = 0


def _int(mapping: Any, key: str) -> int:
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return value if isinstance(value, int) else 0


def chat_usage(raw: dict[str, Any]) -> TurnUsage:
    return TurnUsage(
        _int(raw, "prompt_tokens"),
        _int(raw, "completion_tokens"),
        _int(raw.get("prompt_tokens_details"), "cached_tokens"),
        _int(raw.get("completion_tokens_details"), "reasoning_tokens"),
    )


@dataclass(slots=True)
class Usage:
    """Token counts summed over every model call of a task (or a session)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    model_calls: int = 0
    """Successful model calls (turns and summaries), so averages can be derived."""

    def add(self, usage: TurnUsage) -> None:
        self.prompt_tokens += usage.prompt
        self.completion_tokens += usage.completion
        self.total_tokens += usage.prompt + usage.completion
        self.cached_tokens += usage.cached
        self.reasoning_tokens += usage.reasoning

    def as_dict(self) -> dict[str, int]:
        """For `TaskCompleted.usage`."""
        return asdict(self)


def sum_usage(items: list[dict[str, Any]]) -> dict[str, int]:
    """Several `Usage.as_dict()` summed (a session's tasks)."""
    total = Usage().as_dict()
    for item in items:
        for key in total:
            value = item.get(key)
            total[key] += value if isinstance(value, int) else 0
    return total


@dataclass(frozen=True, slots=True)
class ToolCallRequest:
    """One complete tool call as the model sent it."""

    id: str
    name: str
    arguments: str
    """The raw JSON text, exactly as streamed."""


class Turn(Protocol):
    """One assembled model turn, whichever API streamed it."""

    usage: TurnUsage | None

    @property
    def text(self) -> str: ...

    def feed(self, event: Any) -> str:
        """Take one streamed event; return its text ("" when none) so the caller can stream it."""
        ...

    def check_complete(self) -> None: ...

    def tool_calls(self) -> list[ToolCallRequest]: ...

    def message(self) -> dict[str, Any]:
        """The assistant message for the stored conversation (Chat Completions format)."""
        ...


def new_call_id() -> str:
    # Some servers omit ids; an invented one keeps tool results matched to calls.
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class _PartialCall:
    id: str = ""
    name: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)


def assistant_message(text: str, calls: list[ToolCallRequest]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ]
    return message


class TurnBuilder:
    """Feeds on Chat Completions chunks (dicts); knows the turn's text, tool calls and usage."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._calls: dict[int, _PartialCall] = {}
        self.usage: TurnUsage | None = None
        self.finish_reason: str | None = None

    def feed(self, event: Any) -> str:
        if not isinstance(event, dict):
            raise MalformedStream(f"a stream chunk is not a JSON object: {str(event)[:80]}")
        usage = event.get("usage")
        if usage:
            self.usage = chat_usage(usage)
        choices = event.get("choices")
        if not choices:
            return ""
        choice = choices[0]
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta") or {}
        parts = delta.get("tool_calls")
        if parts:
            self._feed_calls(parts)
        text = delta.get("content")
        if text:
            self._text.append(text)
            return str(text)
        return ""

    def _feed_calls(self, parts: list[dict[str, Any]]) -> None:
        for position, part in enumerate(parts):
            # Arguments (and, on some servers, names) arrive split across chunks; index ties them.
            index = part.get("index", position)
            call = self._calls.get(index)
            if call is None:
                call = self._calls[index] = _PartialCall(id=new_call_id())
            if part.get("id"):
                call.id = part["id"]
            function = part.get("function") or {}
            if function.get("name"):
                call.name.append(function["name"])
            if function.get("arguments"):
                call.arguments.append(function["arguments"])

    @property
    def text(self) -> str:
        return "".join(self._text)

    def check_complete(self) -> None:
        """Raise `IncompleteStream` when the server stopped before saying the turn was done."""
        if self.finish_reason is None:
            raise IncompleteStream("the model's stream ended before the answer was complete")

    def tool_calls(self) -> list[ToolCallRequest]:
        return [
            ToolCallRequest(id=call.id, name="".join(call.name), arguments="".join(call.arguments))
            for _, call in sorted(self._calls.items())
        ]

    def message(self) -> dict[str, Any]:
        return assistant_message(self.text, self.tool_calls())
