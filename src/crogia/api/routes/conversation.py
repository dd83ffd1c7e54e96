"""A session's conversation, in the two shapes the original web client reads.

The store keeps OpenAI chat messages (user, assistant with optional `tool_calls`, tool); this
module only reshapes them: `/conversation` is its chat view (user and assistant text, `type`
human/ai), `/conversation/full` is the history as OpenAI Responses items (its workflow view).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter
from pydantic import Field

from crogia.api.deps import RuntimeDep, SessionRowDep
from crogia.api.errors import ERRORS
from crogia.api.schemas import _Model

router = APIRouter(prefix="/api/sessions/{session_id}", tags=["tasks"], responses=ERRORS)


class ChatMessage(_Model):
    id: str
    type: str = Field(..., description="`human` (the user) or `ai` (the assistant).")
    content: str
    role: str


class Conversation(_Model):
    session_id: str
    messages: list[ChatMessage]
    last_task: str
    total_messages: int


class ConversationFull(_Model):
    session_id: str
    conversation_history: list[dict[str, Any]] = Field(
        ..., description="OpenAI Responses items: user message, assistant message, function_call(_output)."
    )
    last_task: str
    total_items: int


def text_of(content: Any) -> str:
    """A message's text: a string as is, the text parts of a list joined, anything else empty."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
    return ""


def chat_view(history: list[dict[str, Any]]) -> list[ChatMessage]:
    out = []
    for idx, message in enumerate(history):
        role, text = message.get("role"), text_of(message.get("content"))
        if role in ("user", "assistant") and text:  # a tool-calls-only turn has no text to show
            kind = "human" if role == "user" else "ai"
            out.append(ChatMessage(id=f"msg_{idx}", type=kind, content=text, role=str(role)))
    return out


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def response_items(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for idx, message in enumerate(history):
        role, text = message.get("role"), text_of(message.get("content"))
        if role == "user":
            items.append({"role": "user", "content": text})
        elif role == "assistant":
            if text:
                items.append({"type": "message", "role": "assistant", "id": f"msg_{idx}",
                              "content": [{"type": "output_text", "text": text}]})  # fmt: skip
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                items.append({"type": "function_call", "id": f"fc_{call.get('id', idx)}",
                              "call_id": str(call.get("id", "")), "name": str(function.get("name", "")),
                              "arguments": _arguments(function.get("arguments", ""))})  # fmt: skip
        elif role == "tool":
            items.append({"type": "function_call_output", "call_id": str(message.get("tool_call_id", "")),
                          "output": text})  # fmt: skip
    return items


@router.get("/conversation", response_model=Conversation, summary="The conversation (chat view)")
async def conversation(row: SessionRowDep, runtime: RuntimeDep) -> Conversation:
    """User and assistant text only, as the original web client renders it."""
    messages = chat_view(await runtime.tasks.conversation(row.id))
    return Conversation(
        session_id=row.id, messages=messages, last_task=row.last_task, total_messages=len(messages)
    )


@router.get("/conversation/full", response_model=ConversationFull, summary="The whole history as items")
async def conversation_full(row: SessionRowDep, runtime: RuntimeDep) -> ConversationFull:
    """Every turn, tool calls and their outputs included, as OpenAI Responses items."""
    items = response_items(await runtime.tasks.conversation(row.id))
    return ConversationFull(
        session_id=row.id, conversation_history=items, last_task=row.last_task, total_items=len(items)
    )
