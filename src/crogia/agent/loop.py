"""The agent loop: stream a turn, run the tools it asks for, repeat until it answers in words.

Small on purpose, on the official `openai` client (Chat Completions, streaming, tool calls).
The conversation is plain OpenAI message dicts without the system prompt, which is prepended
at call time; `save` gets a snapshot after every model turn and every tool result, so a
crash or a cancel loses at most the step in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from openai import AsyncOpenAI

from crogia.agent.conversation import CANCELLED, INTERRUPTED, close_open_tool_calls
from crogia.agent.errors import AgentError, AgentNotConfigured, MaxTurnsExceeded, ModelError
from crogia.agent.host import ToolHost
from crogia.agent.model import ModelCaller, RetryPolicy
from crogia.agent.prompt import system_prompt as default_system_prompt
from crogia.agent.stream import ToolCallRequest, TurnBuilder, Usage
from crogia.agent.tools import Toolbox, default_toolbox
from crogia.config import Settings
from crogia.events import ErrorEvent, Event, TextDelta, ToolCall, ToolComplete

__all__ = [
    "Agent",
    "AgentError",
    "AgentNotConfigured",
    "MaxTurnsExceeded",
    "ModelError",
    "RetryPolicy",
    "RunOutcome",
]

Emit = Callable[[Event], Awaitable[None]]
Save = Callable[[list[dict[str, Any]]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How a run that finished normally went."""

    final_text: str
    """The model's last answer (the one without tool calls)."""
    turns: int
    """Model turns taken."""
    tool_calls: int
    usage: dict[str, int]
    """Tokens summed over every turn of this run (`Usage.as_dict()`: prompt_tokens, completion_tokens,
    total_tokens, cached_tokens, reasoning_tokens, model_calls)."""


class Agent:
    """Runs tasks against one model; safe to share between sessions (it keeps no run state)."""

    def __init__(
        self,
        *,
        model: str,
        api_key: str = "",
        base_url: str | None = None,
        client: AsyncOpenAI | None = None,
        max_turns: int = 50,
        retries: int = 4,
        timeout: float = 600.0,
        retry_policy: RetryPolicy | None = None,
        toolbox: Toolbox | None = None,
        system_prompt: str | Callable[[], str] | None = None,
        model_options: Mapping[str, Any] | None = None,
    ) -> None:
        """`client`, when given, is used (with its own retries off) instead of building one from
        api_key/base_url/timeout; `retry_policy` overrides `retries`; `model_options` go into
        every request (e.g. `{"reasoning_effort": "low"}`)."""
        if max_turns < 1:
            raise ValueError("max_turns must be at least 1")
        self.model = model
        self.max_turns = max_turns
        self.policy = retry_policy or RetryPolicy(retries=retries)
        self.toolbox = toolbox or default_toolbox()
        self.system_prompt = system_prompt if system_prompt is not None else default_system_prompt()
        self._api_key, self._base_url, self._timeout = api_key, base_url, timeout
        self._given_client = client
        self._options = dict(model_options or {})
        self._caller: ModelCaller | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> Agent:
        """An agent configured from Crogia's settings (`overrides` win)."""
        params: dict[str, Any] = {
            "model": settings.model_name,
            "api_key": settings.openai_api_key,
            "base_url": settings.openai_base_url,
            "max_turns": settings.max_turns,
            "retries": settings.model_retries,
            "timeout": settings.model_timeout,
        }
        return cls(**(params | overrides))

    async def run(
        self,
        task: str,
        history: list[dict[str, Any]],
        host: ToolHost,
        *,
        emit: Callable[[Event], Awaitable[None]],
        save: Callable[[list[dict[str, Any]]], Awaitable[None]],
        task_id: str | None = None,
    ) -> RunOutcome:
        """Run `task` continuing `history` (the list is not modified).

        `save` receives the whole conversation after each step; it only ever grows by appending
        (earlier messages never change), so a store may append `messages[len(saved):]`.

        Raises `AgentError` when the run cannot finish; on cancellation the saved conversation is
        left valid (open tool calls answered "cancelled by the user") and CancelledError propagates.
        """
        caller = self._model_caller()
        prompt = self.system_prompt() if callable(self.system_prompt) else self.system_prompt
        run = _Run(self, caller, host, history, emit=emit, save=save, task_id=task_id, prompt=prompt)
        return await run.execute(task)

    async def aclose(self) -> None:
        """Close the HTTP client this agent built (a client passed in is left to its owner)."""
        if self._caller is not None and self._given_client is None:
            await self._caller.client.close()
        self._caller = None

    def _model_caller(self) -> ModelCaller:
        # Checked before any call so a misconfigured server fails with words, not an HTTP 401.
        if not self.model:
            raise AgentNotConfigured("no model is configured: set MODEL_NAME")
        if self._caller is None:
            if self._given_client is not None:
                client = self._given_client.with_options(max_retries=0)
            elif not self._api_key:
                raise AgentNotConfigured(
                    "no API key is configured: set OPENAI_API_KEY "
                    "(any non-empty value for a server that needs none)"
                )
            else:
                client = AsyncOpenAI(
                    api_key=self._api_key, base_url=self._base_url, timeout=self._timeout, max_retries=0
                )
            self._caller = ModelCaller(
                client,
                model=self.model,
                tools=self.toolbox.schemas,
                policy=self.policy,
                options=self._options,
            )
        return self._caller


class _Run:
    """The state of one `Agent.run` call."""

    def __init__(
        self,
        agent: Agent,
        caller: ModelCaller,
        host: ToolHost,
        history: list[dict[str, Any]],
        *,
        emit: Emit,
        save: Save,
        task_id: str | None,
        prompt: str,
    ) -> None:
        self.agent, self.caller, self.host = agent, caller, host
        self.emit, self.save, self.task_id = emit, save, task_id
        self.system = {"role": "system", "content": prompt}
        self.messages = list(history)
        self.usage = Usage()
        self.turns = self.tool_calls = 0
        self._partial: list[str] = []
        """Text streamed so far in the turn in flight (kept if the run is cancelled)."""
        self._running: ToolCallRequest | None = None

    async def execute(self, task: str) -> RunOutcome:
        # A history saved by a server that died mid-tool has unanswered calls the API would reject.
        close_open_tool_calls(self.messages, INTERRUPTED)
        self.messages.append({"role": "user", "content": task})
        try:
            await self._save()
            return await self._loop()
        except asyncio.CancelledError:
            await self._close_cancelled()
            raise

    async def _loop(self) -> RunOutcome:
        limit = self.agent.max_turns
        for turn in range(1, limit + 1):
            self.turns = turn
            reply = await self._model_turn()
            calls = reply.tool_calls()
            if not calls:
                return RunOutcome(reply.text, self.turns, self.tool_calls, self.usage.as_dict())
            if turn == limit:
                break
            for call in calls:
                await self._call_tool(call)
        close_open_tool_calls(self.messages, f"not run: the task reached its limit of {limit} turns")
        await self._save()
        raise MaxTurnsExceeded(
            f"the task reached its limit of {limit} model turns without finishing (MAX_TURNS)", turns=limit
        )

    async def _model_turn(self) -> TurnBuilder:
        self._partial.clear()
        reply = await self.caller.turn(
            [self.system, *self.messages], on_text=self._on_text, on_retry=self._on_retry
        )
        self._partial.clear()
        if reply.usage is not None:
            self.usage.add(reply.usage)
        self.usage.model_calls += 1
        self.messages.append(reply.message())
        await self._save()
        return reply

    async def _call_tool(self, call: ToolCallRequest) -> None:
        self._running = call
        await self.emit(
            ToolCall(tool_name=call.name, arguments=call.arguments, call_id=call.id, task_id=self.task_id)
        )
        result = await self.agent.toolbox.call(self.host, call.name, call.arguments)
        self.messages.append({"role": "tool", "tool_call_id": call.id, "content": result.output})
        self._running = None
        self.tool_calls += 1
        await self._save()
        await self.emit(
            ToolComplete(
                tool_name=call.name,
                output=result.output,
                call_id=call.id,
                is_error=result.is_error,
                task_id=self.task_id,
            )
        )

    async def _on_text(self, text: str) -> None:
        self._partial.append(text)
        await self.emit(TextDelta(content=text, task_id=self.task_id))

    async def _on_retry(self, reason: str, delay: float) -> None:
        self._partial.clear()  # the partial turn is discarded; the retry streams it again
        await self.emit(ErrorEvent(message=f"Model call failed: {reason}", task_id=self.task_id))

    async def _close_cancelled(self) -> None:
        """Leave a conversation the next task can continue from, then let the cancel go on."""
        if self._partial:
            # The user saw this text stream; keep it so the model knows what it already said.
            self.messages.append({"role": "assistant", "content": "".join(self._partial)})
        close_open_tool_calls(self.messages, CANCELLED)
        await self._save()
        if self._running is not None:
            call = self._running
            await self.emit(
                ToolComplete(
                    tool_name=call.name,
                    output=CANCELLED,
                    call_id=call.id,
                    is_error=True,
                    task_id=self.task_id,
                )
            )

    async def _save(self) -> None:
        # A snapshot: the caller may keep it while the run goes on appending.
        await self.save(list(self.messages))
