"""One streamed model turn, with our own retries.

The openai client's built-in retries are switched off (`max_retries=0`) on every client the
agent uses. Retrying here instead covers all failures the same way (an error status before the
stream starts, and a stream that breaks half-way, which the client never retries), lets the
run tell the user it is retrying, and keeps delays and attempt counts explicit and testable.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from openai import APIConnectionError, APIError, APIStatusError, APITimeoutError, AsyncOpenAI, AsyncStream

from crogia.agent.errors import ContextOverflow, ModelError
from crogia.agent.profiles import ModelApi, ModelProfile, profile_for
from crogia.agent.responses import ResponsesTurn, chat_wire, responses_input, responses_tools
from crogia.agent.stream import IncompleteStream, MalformedStream, Turn, TurnBuilder

log = logging.getLogger(__name__)

TextSink = Callable[[str], Awaitable[None]]
"""Receives each piece of streamed text as it arrives."""
RetrySink = Callable[[str, float], Awaitable[None]]
"""Told (reason, delay seconds) before a retry; the partial turn is being discarded."""

_RETRY_STATUSES = frozenset({408, 409, 429})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a failed model call is tried again."""

    retries: int = 4
    """Attempts after the first one."""
    backoff_base: float = 0.5
    """First delay in seconds; doubled each attempt, with up to 25% jitter taken off."""
    backoff_max: float = 8.0
    max_retry_after: float = 60.0
    """A server's `retry-after` is honoured up to this many seconds."""

    def delay(self, attempt: int, exc: BaseException) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        hinted = _retry_after(exc)
        if hinted is not None:
            return min(hinted, self.max_retry_after)
        backoff = min(self.backoff_max, self.backoff_base * 2.0**attempt)
        return backoff * (1 - 0.25 * random.random())


def retry_reason(exc: Exception) -> str | None:
    """Why `exc` is worth retrying, in words; None when retrying cannot help."""
    if isinstance(exc, IncompleteStream):
        return "the model's stream ended before the answer was complete"
    if isinstance(exc, MalformedStream):
        return str(exc)
    if isinstance(exc, APITimeoutError):
        return "the model server did not answer in time"
    if isinstance(exc, APIConnectionError):
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        return f"the connection to the model server failed{cause}"
    if isinstance(exc, APIStatusError):
        should = exc.response.headers.get("x-should-retry")
        if should in ("true", "false"):
            return f"HTTP {exc.status_code} from the model server" if should == "true" else None
        if exc.status_code in _RETRY_STATUSES or exc.status_code >= 500:
            return f"HTTP {exc.status_code} from the model server"
        return None
    if isinstance(exc, APIError):
        return f"the model server reported an error mid-stream: {exc.message}"
    return None


def _retry_after(exc: BaseException) -> float | None:
    if not isinstance(exc, APIStatusError):
        return None
    for header, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = exc.response.headers.get(header)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue  # an HTTP date: fall back to our own backoff
    return None


class ModelCaller:
    """Streams turns for one model, one API and one tool set."""

    def __init__(
        self,
        client: AsyncOpenAI,
        *,
        model: str,
        tools: Sequence[Mapping[str, Any]],
        policy: RetryPolicy,
        profile: ModelProfile | None = None,
        api: ModelApi = "chat",
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.client = client
        self.policy = policy
        self.api: ModelApi = api
        self.profile = profile or profile_for(model)
        options = dict(options or {})
        extra = dict(options.pop("extra_body", None) or {})
        sampling = self.profile.chat_options() if api == "chat" else self.profile.responses_options()
        # Built once: only the conversation changes from one turn to the next.
        self._body: dict[str, Any] = {"model": model, "stream": True, **sampling, **options, **extra}
        if api == "chat":
            self._body["stream_options"] = {"include_usage": True}
        self._tools = list(tools) if api == "chat" else responses_tools([dict(t) for t in tools])
        self._path = "/chat/completions" if api == "chat" else "/responses"

    async def turn(
        self,
        messages: list[dict[str, Any]],
        *,
        system: str,
        on_text: TextSink,
        on_retry: RetrySink,
        tools: bool = True,
    ) -> Turn:
        """Stream one complete turn for `messages` (the system prompt apart); raise `ModelError`."""
        attempts = self.policy.retries + 1
        attempt = 0
        while True:
            try:
                return await self._attempt(self._request(messages, system, tools), on_text)
            except (APIError, IncompleteStream, MalformedStream) as exc:
                if self._drop_rejected(exc):
                    continue  # not an attempt: the request changed, the server is fine
                reason = retry_reason(exc)
                if reason is None:
                    raise _refused(exc) from exc
                if attempt + 1 == attempts:
                    raise ModelError(
                        f"the model call failed after {attempts} attempts: {reason}", attempts=attempts
                    ) from exc
                delay = self.policy.delay(attempt, exc)
                await on_retry(
                    f"{reason}; retrying in {delay:.1f}s (attempt {attempt + 2} of {attempts})", delay
                )
                await anyio.sleep(delay)
                attempt += 1

    def _request(self, messages: list[dict[str, Any]], system: str, tools: bool) -> dict[str, Any]:
        body = dict(self._body)
        if self.api == "chat":
            body["messages"] = [{"role": "system", "content": system}, *chat_wire(messages)]
        else:
            body["instructions"] = system
            body["input"] = responses_input(messages)
        if tools and self._tools:
            body["tools"] = self._tools
        return body

    async def _attempt(self, body: dict[str, Any], on_text: TextSink) -> Turn:
        turn: Turn = TurnBuilder() if self.api == "chat" else ResponsesTurn()
        # The body is wire-format JSON already, and the stream is read as the plain dicts the
        # SSE decoder yields: typed request params and typed chunks cost ~0.3 ms per message and
        # most of the per-chunk CPU, for nothing the loop needs.
        stream = await self.client.post(
            self._path, cast_to=object, body=body, stream=True, stream_cls=AsyncStream[object]
        )
        # `async with` closes the HTTP response on every exit, cancellation included.
        async with stream:
            async for event in stream:
                text = turn.feed(event)
                if text:
                    await on_text(text)
        turn.check_complete()
        return turn

    def _drop_rejected(self, exc: Exception) -> bool:
        """A 400 naming one of our optional parameters: leave it out from now on (once each)."""
        if not isinstance(exc, APIStatusError) or exc.status_code != 400:
            return False
        named = _named_parameter(exc, [k for k in self._body if k not in _REQUIRED])
        if named is None:
            return False
        log.warning("the model server rejected the parameter %r (%s); sending without it", named, exc.message)
        del self._body[named]
        return True


_REQUIRED = frozenset({"model", "stream", "messages", "input", "instructions", "tools"})


def _error_field(exc: APIStatusError, key: str) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    value = body.get(key) if isinstance(body, dict) else None
    return value if isinstance(value, str) else ""


def _named_parameter(exc: APIStatusError, candidates: list[str]) -> str | None:
    param = _error_field(exc, "param")
    if param in candidates:
        return param
    message = _error_field(exc, "message") or exc.message
    return next((key for key in candidates if f"'{key}'" in message or f"`{key}`" in message), None)


def is_context_overflow(exc: BaseException) -> bool:
    """The server said the prompt does not fit the model's window."""
    if not isinstance(exc, APIStatusError) or exc.status_code != 400:
        return False
    text = f"{_error_field(exc, 'code')} {_error_field(exc, 'message') or exc.message}".lower()
    return "context_length_exceeded" in text or "maximum context length" in text


def _refused(exc: Exception) -> ModelError:
    if is_context_overflow(exc):
        return ContextOverflow(f"the conversation does not fit the model's context window: {_describe(exc)}")
    return ModelError(f"the model server refused the request: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, APIStatusError):
        return f"HTTP {exc.status_code}: {exc.message}"
    return str(exc)
