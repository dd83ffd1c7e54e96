"""A scripted OpenAI-compatible server on 127.0.0.1 (Chat Completions and Responses), for tests.

It speaks the real protocols over real HTTP/1.1 (keep-alive, chunked SSE: `data: {...}` lines
ending with `data: [DONE]` for Chat Completions, `event:`/`data:` pairs ending with
`response.completed` for Responses), so the official `openai` client runs unmodified::

    from tests.support.scripted_openai import Call, HttpError, Reply, ScriptedOpenAI

    async with ScriptedOpenAI(
        Reply(tool_calls=[Call("write_file", {"path": "a.py", "content": "print(1)"})]),
        HttpError(429, retry_after=0.01),
        Reply("done", usage=(120, 8)),
    ) as server:
        client = AsyncOpenAI(api_key="test", base_url=server.base_url)
        ...
        server.requests[0]["messages"]   # what the model was sent (parsed JSON bodies)

Each POST to `.../chat/completions` or `.../responses` takes the next scripted item: a `Reply`,
an `HttpError`, or a responder callable `f(request_body) -> Reply | HttpError` (sync or async). When the
script is empty the `responder=` fallback answers; without one the server answers HTTP 500
"script exhausted", so a test that makes an unplanned call fails loudly. As OpenAI does, it
answers 400 `context_length_exceeded` for a prompt past `context_limit` tokens (4 characters a
token) and 400 `unsupported_parameter` for a parameter named in `unsupported`, without taking a
scripted item. The server runs on the current event loop; every connection task is owned and
cancelled on exit.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections import deque
from dataclasses import replace
from types import TracebackType
from typing import Any

from tests.support.scripted_replies import (
    Answer,
    Call,
    HttpError,
    Reply,
    Responder,
    Scripted,
    context_exceeded,
    error_body,
    reply_chunks,
    reply_completion,
    unsupported_parameter,
)
from tests.support.scripted_responses import response_events

__all__ = ["Call", "HttpError", "Reply", "Responder", "Scripted", "ScriptedOpenAI", "prompt_tokens"]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
}


class ScriptedOpenAI:
    """The scripted server; use as `async with ScriptedOpenAI(*script) as server`."""

    def __init__(
        self,
        *script: Scripted,
        responder: Responder | None = None,
        context_limit: int = 0,
        unsupported: tuple[str, ...] = (),
        auto_usage: bool = False,
    ) -> None:
        self.context_limit = context_limit
        """Prompts estimated past this many tokens get 400 context_length_exceeded (0: no limit)."""
        self.unsupported = unsupported
        self.auto_usage = auto_usage
        """Replies without scripted usage report the prompt's estimated tokens (and 10 completion)."""
        self.paths: list[str] = []
        """The path of every request in `requests`."""
        self.script: deque[Scripted] = deque(script)
        """Items still to answer, in order; `add()` appends more."""
        self.responder = responder
        """Answers when the script is empty (None: HTTP 500)."""
        self.requests: list[dict[str, Any]] = []
        """Parsed JSON body of every chat completion request, in arrival order."""
        self.base_url = ""
        """`http://127.0.0.1:<port>/v1`, set on entry."""
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    def add(self, *items: Scripted) -> None:
        """Append items to the script."""
        self.script.extend(items)

    def messages(self, request: int = -1) -> list[dict[str, Any]]:
        """The `messages` the model was sent in request number `request` (default: the last)."""
        messages: list[dict[str, Any]] = self.requests[request]["messages"]
        return messages

    def inputs(self, request: int = -1) -> list[dict[str, Any]]:
        """The `input` items of Responses request number `request` (default: the last)."""
        items: list[dict[str, Any]] = self.requests[request]["input"]
        return items

    async def __aenter__(self) -> ScriptedOpenAI:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio starts this as a task; keep its handle so exit can cancel it.
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away: normal for cancelled streams
        except asyncio.CancelledError:
            # Only our own __aexit__ cancels these tasks. Ending normally matters: Python 3.11's
            # stream callback calls task.exception(), which raises on a cancelled task.
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection must close."""
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        method, target, _ = head[0].split(" ", 2)
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)
        }
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        path = target.split("?")[0]
        if method != "POST" or not path.endswith(("/chat/completions", "/responses")):
            await _send_json(writer, 404, {"error": {"message": f"no route {method} {target}"}})
            return True
        try:
            request = json.loads(body)
        except ValueError:
            await _send_json(writer, 400, {"error": {"message": "request body is not JSON"}})
            return True
        self.requests.append(request)
        self.paths.append(path)
        answer = self._refusal(request) or await self._next_answer(request)
        if isinstance(answer, Reply) and answer.usage is None and self.auto_usage:
            answer = replace(answer, usage=(prompt_tokens(request), 10))
        if isinstance(answer, HttpError):
            await _send_error(writer, answer)
            return True
        if path.endswith("/responses"):
            return await self._stream_responses(writer, answer)
        if not request.get("stream"):
            await _send_json(
                writer, 200, reply_completion(answer, request_no=len(self.requests), model=_model(request))
            )
            return True
        return await self._stream(writer, answer, request)

    def _refusal(self, request: dict[str, Any]) -> HttpError | None:
        for name in self.unsupported:
            if name in request:
                return unsupported_parameter(name)
        tokens = prompt_tokens(request)
        if self.context_limit and tokens > self.context_limit:
            return context_exceeded(self.context_limit, tokens)
        return None

    async def _next_answer(self, request: dict[str, Any]) -> Answer:
        item = self.script.popleft() if self.script else self.responder
        if item is None:
            n = len(self.requests)
            return HttpError(500, f"scripted server: script exhausted (request #{n} has no scripted answer)")
        if isinstance(item, Reply | HttpError):
            return item
        answer = item(request)
        return await answer if inspect.isawaitable(answer) else answer

    async def _stream(self, writer: asyncio.StreamWriter, reply: Reply, request: dict[str, Any]) -> bool:
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        chunks = reply_chunks(
            reply, request_no=len(self.requests), model=_model(request), include_usage=include_usage
        )
        head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        writer.write(head.encode())
        payloads = list(reply.raw) if reply.raw is not None else [json.dumps(chunk) for chunk in chunks]
        for n, payload in enumerate(payloads):
            if n == reply.break_after:
                return await _stop_early(writer, reply)
            if n and reply.delay:
                await asyncio.sleep(reply.delay)
            _write_chunk(writer, f"data: {payload}\n\n".encode())
            await writer.drain()
        if reply.done:
            _write_chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _stream_responses(self, writer: asyncio.StreamWriter, reply: Reply) -> bool:
        events = response_events(reply, request_no=len(self.requests), model=_model(self.requests[-1]))
        writer.write(_SSE_HEAD)
        for n, (name, payload) in enumerate(events):
            if n == reply.break_after:
                return await _stop_early(writer, reply)
            if n and reply.delay:
                await asyncio.sleep(reply.delay)
            _write_chunk(writer, f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode())
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


_SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def prompt_tokens(request: dict[str, Any]) -> int:
    """The request's prompt in tokens, as this server counts them (4 characters a token)."""
    prompt = request.get("messages") or [request.get("instructions"), request.get("input")]
    return len(json.dumps(prompt)) // 4


async def _stop_early(writer: asyncio.StreamWriter, reply: Reply) -> bool:
    if reply.drop == "eof":
        writer.write(b"0\r\n\r\n")  # a complete HTTP body, but no finish_reason and no [DONE]
        await writer.drain()
        return True
    await writer.drain()
    writer.transport.abort()  # no terminating chunk: the client sees a broken body
    return False


def _model(request: dict[str, Any]) -> str:
    return str(request.get("model") or "scripted")


def _write_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))


async def _send_json(
    writer: asyncio.StreamWriter, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    data = json.dumps(body).encode()
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "content-type: application/json"]
    lines += [f"content-length: {len(data)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
    await writer.drain()


async def _send_error(writer: asyncio.StreamWriter, error: HttpError) -> None:
    headers = dict(error.headers)
    if error.retry_after is not None:
        headers["retry-after"] = str(error.retry_after)
    await _send_json(writer, error.status, error_body(error), headers)
