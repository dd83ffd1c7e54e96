"""One agent run: the turn/tool cycle, saving after every step, and a clean end on cancel.

`save` gets a snapshot after every model turn and every tool result, so a crash or a cancel
loses at most the step in flight; on cancellation the conversation is closed (open tool calls
answered, streamed text kept) and saved before the CancelledError goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from crogia.agent.conversation import CANCELLED, INTERRUPTED, close_open_tool_calls
from crogia.agent.errors import MaxTurnsExceeded
from crogia.agent.host import ToolHost
from crogia.agent.model import ModelCaller
from crogia.agent.stream import ToolCallRequest, TurnBuilder, Usage
from crogia.agent.tools import Toolbox
from crogia.events import ErrorEvent, Event, TextDelta, ToolCall, ToolComplete

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


class TaskRun:
    """The state of one `Agent.run` call."""

    def __init__(
        self,
        caller: ModelCaller,
        toolbox: Toolbox,
        host: ToolHost,
        history: list[dict[str, Any]],
        *,
        max_turns: int,
        emit: Emit,
        save: Save,
        task_id: str | None,
        prompt: str,
    ) -> None:
        self.caller, self.toolbox, self.host, self.max_turns = caller, toolbox, host, max_turns
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
        limit = self.max_turns
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
        result = await self.toolbox.call(self.host, call.name, call.arguments)
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
