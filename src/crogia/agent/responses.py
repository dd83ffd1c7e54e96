"""The Responses API: its streamed events assembled into a turn, and the conversation as its input.

The stored conversation stays in Chat Completions messages whichever API produced it, so a
session can switch API between tasks. A Responses turn's own output items (reasoning with its
encrypted content, the message, the function calls) ride along on the assistant message under
`items` and are sent back verbatim: with `store=false` that is how a reasoning model keeps
its thread across turns. The Chat Completions wire drops `items` (see `chat_wire`).
"""

from __future__ import annotations

from typing import Any

from crogia.agent.stream import (
    IncompleteStream,
    MalformedStream,
    ToolCallRequest,
    TurnUsage,
    _int,
    assistant_message,
    new_call_id,
)

ITEMS = "items"
"""The key of an assistant message that holds its Responses output items."""
_INPUT_KEYS = {
    "reasoning": ("type", "id", "summary", "encrypted_content"),
    "message": ("type", "id", "role", "content"),
    "function_call": ("type", "id", "call_id", "name", "arguments"),
}


def responses_usage(raw: dict[str, Any]) -> TurnUsage:
    return TurnUsage(
        _int(raw, "input_tokens"),
        _int(raw, "output_tokens"),
        _int(raw.get("input_tokens_details"), "cached_tokens"),
        _int(raw.get("output_tokens_details"), "reasoning_tokens"),
    )


class ResponsesTurn:
    """Feeds on Responses stream events (dicts); the same interface as `stream.TurnBuilder`."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._items: dict[int, dict[str, Any]] = {}
        self._arguments: dict[int, list[str]] = {}
        self.usage: TurnUsage | None = None
        self.status: str | None = None

    def feed(self, event: Any) -> str:
        if not isinstance(event, dict):
            raise MalformedStream(f"a stream event is not a JSON object: {str(event)[:80]}")
        kind = event.get("type")
        if kind == "response.output_text.delta":
            delta = str(event.get("delta") or "")
            self._text.append(delta)
            return delta
        if kind == "response.function_call_arguments.delta":
            self._arguments.setdefault(_index(event), []).append(str(event.get("delta") or ""))
        elif kind in ("response.output_item.added", "response.output_item.done"):
            item = event.get("item")
            if isinstance(item, dict):
                self._items[_index(event)] = item
        elif kind in ("response.completed", "response.incomplete"):
            self._finish(event.get("response") or {}, kind)
        elif kind == "response.failed" or kind == "error":
            raise MalformedStream(f"the model server reported a failure mid-stream: {_failure(event)}")
        return ""

    def _finish(self, response: dict[str, Any], kind: str) -> None:
        self.status = kind.removeprefix("response.")
        if isinstance(response.get("usage"), dict):
            self.usage = responses_usage(response["usage"])

    @property
    def text(self) -> str:
        return "".join(self._text)

    def check_complete(self) -> None:
        if self.status is None:
            raise IncompleteStream("the model's stream ended before the answer was complete")

    def tool_calls(self) -> list[ToolCallRequest]:
        calls = []
        for index, item in sorted(self._items.items()):
            if item.get("type") != "function_call":
                continue
            arguments = item.get("arguments") or "".join(self._arguments.get(index, ()))
            if not item.get("call_id"):
                item["call_id"] = new_call_id()
            calls.append(ToolCallRequest(str(item["call_id"]), str(item.get("name") or ""), str(arguments)))
            item["arguments"] = arguments
        return calls

    def message(self) -> dict[str, Any]:
        message = assistant_message(self.text, self.tool_calls())
        items = [_input_item(item) for _, item in sorted(self._items.items())]
        message[ITEMS] = [item for item in items if item is not None]
        return message


def _index(event: dict[str, Any]) -> int:
    index = event.get("output_index")
    return index if isinstance(index, int) else 0


def _failure(event: dict[str, Any]) -> str:
    error = (event.get("response") or {}).get("error") or event
    return str(error.get("message") or error.get("code") or "no reason given")


def _input_item(item: dict[str, Any]) -> dict[str, Any] | None:
    keys = _INPUT_KEYS.get(str(item.get("type")))
    return None if keys is None else {key: item[key] for key in keys if key in item}


def chat_wire(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as Chat Completions accepts them (Responses items dropped)."""
    return [
        message if ITEMS not in message else {k: v for k, v in message.items() if k != ITEMS}
        for message in messages
    ]


def responses_input(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages (system prompt excluded) as Responses input items."""
    items: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            items.append(
                {
                    "type": "function_call_output",
                    "call_id": message.get("tool_call_id"),
                    "output": message.get("content") or "",
                }
            )
        elif role == "assistant" and message.get(ITEMS):
            items.extend(message[ITEMS])
        elif role == "assistant":
            if message.get("content"):
                items.append({"role": "assistant", "content": message["content"]})
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                items.append(
                    {
                        "type": "function_call",
                        "call_id": call.get("id"),
                        "name": function.get("name"),
                        "arguments": function.get("arguments") or "",
                    }
                )
        else:
            items.append({"role": role or "user", "content": message.get("content") or ""})
    return items


def responses_tools(chat_tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat Completions tool schemas in the Responses API's flat shape."""
    return [{"type": "function", **tool["function"], "strict": False} for tool in chat_tools]
