"""Keeping a persisted conversation valid for the next model call.

OpenAI rejects a conversation in which an assistant's tool call has no tool message answering
it. A run that is cancelled (or a server that dies) mid-tool would leave exactly that, so the
loop closes such calls before saving and before continuing an old history.
"""

from __future__ import annotations

from typing import Any

CANCELLED = "cancelled by the user"
INTERRUPTED = "not run: the previous task was interrupted before this tool finished"


def open_tool_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool calls of the last assistant message that no later tool message answers."""
    answered: set[str] = set()
    for message in reversed(messages):
        role = message.get("role")
        if role == "tool":
            answered.add(str(message.get("tool_call_id")))
        elif role == "assistant":
            calls: list[dict[str, Any]] = message.get("tool_calls") or []
            return [call for call in calls if call.get("id") not in answered]
        else:
            return []  # a user message ends the search: earlier calls were closed already
    return []


def close_open_tool_calls(messages: list[dict[str, Any]], note: str) -> list[dict[str, Any]]:
    """Answer every open tool call with `note`, in place; return the calls that were closed."""
    closed = open_tool_calls(messages)
    messages.extend({"role": "tool", "tool_call_id": call.get("id"), "content": note} for call in closed)
    return closed
