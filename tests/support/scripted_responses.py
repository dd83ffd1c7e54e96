"""A scripted `Reply` as the Responses API streams it: named SSE events, as OpenAI sends them.

Each event is `(name, payload)`; the server writes `event: <name>` and `data: <json>` lines and
no `[DONE]` (the Responses stream ends with `response.completed` or `response.incomplete`).
Text arrives as `response.output_text.delta` events, tool-call arguments split across
`response.function_call_arguments.delta` events, and a reasoning item comes with an
`encrypted_content` blob that a stateless (`store=false`) client must send back.
"""

from __future__ import annotations

import time
from typing import Any

from tests.support.scripted_replies import Reply, split_evenly, text_pieces


class _Events:
    def __init__(self, request_no: int, model: str) -> None:
        self.request_no = request_no
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.response: dict[str, Any] = {
            "id": f"resp_scripted_{request_no}",
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "model": model,
            "output": [],
            "usage": None,
            "error": None,
            "incomplete_details": None,
        }

    def add(self, name: str, **payload: Any) -> None:
        self.events.append((name, {"type": name, "sequence_number": len(self.events), **payload}))

    def item(self, item: dict[str, Any], deltas: list[tuple[str, dict[str, Any]]]) -> None:
        index = len(self.response["output"])
        self.add("response.output_item.added", output_index=index, item={**item, **_empty(item)})
        for name, payload in deltas:
            self.add(name, item_id=item["id"], output_index=index, **payload)
        self.add("response.output_item.done", output_index=index, item=item)
        self.response["output"].append(item)


def _empty(item: dict[str, Any]) -> dict[str, Any]:
    """The item as first announced: no content yet."""
    if item["type"] == "message":
        return {"content": [], "status": "in_progress"}
    if item["type"] == "function_call":
        return {"arguments": "", "status": "in_progress"}
    return {"summary": [], "encrypted_content": None}


def response_events(reply: Reply, *, request_no: int, model: str) -> list[tuple[str, dict[str, Any]]]:
    """Every event of `reply` in stream order."""
    out = _Events(request_no, model)
    out.add("response.created", response=dict(out.response))
    out.add("response.in_progress", response=dict(out.response))
    n = request_no
    if reply.reasoning is not None:
        summary = [{"type": "summary_text", "text": reply.reasoning}]
        item = {
            "id": f"rs_{n}",
            "type": "reasoning",
            "summary": summary,
            "encrypted_content": f"enc:{n}:opaque",
        }
        delta = ("response.reasoning_summary_text.delta", {"summary_index": 0, "delta": reply.reasoning})
        out.item(item, [delta])
    pieces = text_pieces(reply)
    if pieces:
        text = "".join(pieces)
        part = {"type": "output_text", "text": text, "annotations": []}
        message = {
            "id": f"msg_{n}",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [part],
        }
        deltas = [
            ("response.output_text.delta", {"content_index": 0, "delta": piece, "logprobs": []})
            for piece in pieces
        ]
        deltas.append(("response.output_text.done", {"content_index": 0, "text": text, "logprobs": []}))
        out.item(message, deltas)
    for index, call in enumerate(reply.tool_calls):
        arguments = call.argument_text
        call_id = call.id if call.id is not None else f"call_{n}_{index}"
        item = {
            "id": f"fc_{n}_{index}",
            "type": "function_call",
            "status": "completed",
            "call_id": call_id,
            "name": call.name,
            "arguments": arguments,
        }
        deltas = [
            ("response.function_call_arguments.delta", {"delta": p})
            for p in split_evenly(arguments, call.pieces)
        ]
        deltas.append(("response.function_call_arguments.done", {"arguments": arguments}))
        out.item(item, deltas)
    _finish(out, reply)
    return out.events


def _finish(out: _Events, reply: Reply) -> None:
    response = out.response
    if reply.usage is not None:
        prompt, completion, cached, reasoning = (*reply.usage, 0, 0)[:4]
        response["usage"] = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + completion,
        }
    if reply.finish_reason == "length":
        response.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
        out.add("response.incomplete", response=response)
    else:
        response["status"] = "completed"
        out.add("response.completed", response=response)
