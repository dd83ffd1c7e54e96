"""Assembling one streamed model turn from its chunks, and summing token usage."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from openai.types.chat import ChatCompletionChunk
from openai.types.completion_usage import CompletionUsage


class IncompleteStream(Exception):
    """The stream ended before the model finished its answer (no finish_reason)."""


@dataclass(slots=True)
class Usage:
    """Token counts summed over every model call of a task."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    model_calls: int = 0
    """Successful model calls (turns), so averages can be derived."""

    def add(self, usage: CompletionUsage) -> None:
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.total_tokens += usage.total_tokens
        if usage.prompt_tokens_details and usage.prompt_tokens_details.cached_tokens:
            self.cached_tokens += usage.prompt_tokens_details.cached_tokens
        if usage.completion_tokens_details and usage.completion_tokens_details.reasoning_tokens:
            self.reasoning_tokens += usage.completion_tokens_details.reasoning_tokens

    def as_dict(self) -> dict[str, int]:
        """For `TaskCompleted.usage`."""
        return asdict(self)


@dataclass(slots=True)
class _PartialCall:
    id: str = ""
    name: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ToolCallRequest:
    """One complete tool call as the model sent it."""

    id: str
    name: str
    arguments: str
    """The raw JSON text, exactly as streamed."""


class TurnBuilder:
    """Feeds on chunks; knows the turn's text, tool calls, usage and whether it finished."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._calls: dict[int, _PartialCall] = {}
        self.usage: CompletionUsage | None = None
        self.finish_reason: str | None = None

    def feed(self, chunk: ChatCompletionChunk) -> str:
        """Take one chunk; return its text content ("" when none) so the caller can stream it."""
        if chunk.usage is not None:
            self.usage = chunk.usage
        if not chunk.choices:
            return ""
        choice = chunk.choices[0]
        if choice.finish_reason is not None:
            self.finish_reason = choice.finish_reason
        delta = choice.delta
        for part in delta.tool_calls or ():
            # Arguments (and, on some servers, names) arrive split across chunks; index ties them.
            call = self._calls.get(part.index)
            if call is None:
                # Some servers omit ids; an invented one keeps tool results matched to calls.
                call = self._calls[part.index] = _PartialCall(id=f"call_{uuid.uuid4().hex[:24]}")
            if part.id:
                call.id = part.id
            if part.function is not None:
                if part.function.name:
                    call.name.append(part.function.name)
                if part.function.arguments:
                    call.arguments.append(part.function.arguments)
        text = delta.content or ""
        if text:
            self._text.append(text)
        return text

    @property
    def text(self) -> str:
        return "".join(self._text)

    def check_complete(self) -> None:
        """Raise `IncompleteStream` when the server stopped before saying the turn was done."""
        if self.finish_reason is None:
            raise IncompleteStream("the model's stream ended before the answer was complete")

    def tool_calls(self) -> list[ToolCallRequest]:
        return [
            ToolCallRequest(
                id=call.id,
                name="".join(call.name),
                arguments="".join(call.arguments),
            )
            for _, call in sorted(self._calls.items())
        ]

    def message(self) -> dict[str, Any]:
        """The assistant message to append to the conversation (OpenAI chat format)."""
        calls = self.tool_calls()
        text = self.text
        message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
        if calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in calls
            ]
        return message
