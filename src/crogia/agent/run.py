"""One agent run: the turn/tool cycle, the context budget, the guards, and a clean end on cancel.

`save` gets a snapshot of the full conversation after every model turn and every batch of tool
results, so a crash or a cancel loses at most the step in flight; on cancellation the
conversation is closed (open tool calls answered, streamed text kept) and saved before the
CancelledError goes on. What the model is sent is the compacted view (`ContextKeeper`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from crogia.agent.compaction import SUMMARY_INSTRUCTIONS, ContextView, transcript
from crogia.agent.context import ContextKeeper, ContextSettings
from crogia.agent.conversation import CANCELLED, INTERRUPTED, close_open_tool_calls
from crogia.agent.errors import AgentError, AgentStuck, ContextOverflow, MaxTurnsExceeded, TaskLimitReached
from crogia.agent.guards import StuckGuard, batches
from crogia.agent.host import ToolHost
from crogia.agent.model import ModelCaller
from crogia.agent.stream import ToolCallRequest, Turn, Usage
from crogia.agent.tools import Toolbox, ToolResult
from crogia.events import ContextCompacted, ErrorEvent, Event, TextDelta, ToolCall, ToolComplete

Emit = Callable[[Event], Awaitable[None]]
Save = Callable[[list[dict[str, Any]]], Awaitable[None]]
SaveView = Callable[[ContextView], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RunLimits:
    max_turns: int = 50
    max_tokens: int = 0
    """Total tokens (prompt + completion, summed over calls); 0: no limit."""
    timeout: float = 0.0
    """Seconds for the whole task; 0: no limit."""


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How a run that finished normally went."""

    final_text: str
    """The model's last answer (the one without tool calls)."""
    turns: int
    """Model turns taken."""
    tool_calls: int
    usage: dict[str, int]
    """Tokens summed over every call of this run (`Usage.as_dict()`: prompt_tokens, completion_tokens,
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
        limits: RunLimits,
        context: ContextSettings,
        view: ContextView,
        emit: Emit,
        save: Save,
        save_view: SaveView,
        task_id: str | None,
        prompt: str,
    ) -> None:
        self.caller, self.toolbox, self.host, self.limits = caller, toolbox, host, limits
        self.emit, self.save, self.save_view, self.task_id = emit, save, save_view, task_id
        self.prompt = prompt
        self.messages = list(history)
        fixed = (len(prompt) + len(str(toolbox.schemas))) // 3
        self.context = ContextKeeper(self.messages, view, context, fixed)
        self.usage = Usage()
        self.turns = self.tool_calls = 0
        self.stuck = StuckGuard()
        self._partial: list[str] = []
        """Text streamed so far in the turn in flight (kept if the run is cancelled)."""
        self._running: list[ToolCallRequest] = []
        self._deadline: asyncio.Timeout | None = None

    async def execute(self, task: str) -> RunOutcome:
        """Run the task; an `AgentError` carries the tokens used so far in `context["usage"]`."""
        try:
            async with asyncio.timeout(self.limits.timeout or None) as deadline:
                self._deadline = deadline
                return await self._execute(task)
        except TimeoutError:
            if not deadline.expired():
                raise
            error = TaskLimitReached(
                f"the task ran out of time after {self.limits.timeout:g}s (TASK_TIMEOUT)"
            )
            error.context["usage"] = self.usage.as_dict()
            raise error from None
        except AgentError as exc:
            exc.context["usage"] = self.usage.as_dict()
            raise

    async def _execute(self, task: str) -> RunOutcome:
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
        limit = self.limits.max_turns
        for turn in range(1, limit + 1):
            self.turns = turn
            reply = await self._model_turn()
            calls = reply.tool_calls()
            if not calls:
                return RunOutcome(reply.text, self.turns, self.tool_calls, self.usage.as_dict())
            if turn == limit:
                break
            await self._check_tokens()
            for batch in batches(calls):
                await self._call_tools(batch)
        await self._stop(f"not run: the task reached its limit of {limit} turns")
        raise MaxTurnsExceeded(
            f"the task reached its limit of {limit} model turns without finishing (MAX_TURNS)", turns=limit
        )

    async def _check_tokens(self) -> None:
        used, limit = self.usage.total_tokens, self.limits.max_tokens
        if limit and used >= limit:
            await self._stop(f"not run: the task reached its limit of {limit} tokens")
            raise TaskLimitReached(
                f"the task used {used} tokens, reaching its limit of {limit} (TASK_MAX_TOKENS)"
            )

    async def _model_turn(self) -> Turn:
        if self.context.over():
            await self._compact()
        try:
            reply = await self._stream_turn()
        except ContextOverflow:
            # The estimate was short of the server's count: compact harder and try once more.
            await self._compact(forced=True)
            reply = await self._stream_turn()
        self.messages.append(reply.message())
        self.context.observe(reply.usage)
        await self._save()
        return reply

    async def _stream_turn(self) -> Turn:
        self._partial.clear()
        reply = await self.caller.turn(
            self.context.messages(), system=self.prompt, on_text=self._on_text, on_retry=self._on_retry
        )
        self._partial.clear()
        self._count(reply)
        return reply

    def _count(self, reply: Turn) -> None:
        if reply.usage is not None:
            self.usage.add(reply.usage)
        self.usage.model_calls += 1

    async def _compact(self, *, forced: bool = False) -> None:
        done = await self.context.compact(self._summarise, forced=forced)
        await self.save_view(self.context.view)
        await self.emit(
            ContextCompacted(
                tokens_before=done.tokens_before,
                tokens_after=done.tokens_after,
                strategy=done.strategy,
                task_id=self.task_id,
            )
        )

    async def _summarise(self, old: list[dict[str, Any]]) -> str:
        chars = self.context.settings.input_tokens  # ~1/3 of the window in characters: room to spare
        request = [{"role": "user", "content": transcript(old, max_chars=chars)}]
        reply = await self.caller.turn(
            request, system=SUMMARY_INSTRUCTIONS, on_text=_ignore, on_retry=self._on_retry, tools=False
        )
        self._count(reply)
        return reply.text.strip() or "(The summary came back empty: earlier details are lost.)"

    async def _call_tools(self, batch: list[ToolCallRequest]) -> None:
        """Run a batch (read-only calls together, others alone); results go back in call order."""
        for call in batch:
            await self.emit(
                ToolCall(tool_name=call.name, arguments=call.arguments, call_id=call.id, task_id=self.task_id)
            )
        self._running = list(batch)
        results = await asyncio.gather(*(self.toolbox.call(self.host, c.name, c.arguments) for c in batch))
        stuck: str | None = None
        for call, result in zip(batch, results, strict=True):
            output, verdict = self.stuck.check(call, result)
            stuck = stuck or verdict
            self.messages.append({"role": "tool", "tool_call_id": call.id, "content": output})
            self._running.remove(call)
            self.tool_calls += 1
            await self._tool_complete(call, ToolResult(output, result.is_error))
        if stuck is not None:
            await self._stop("not run: the task was stopped by the stuck guard")
            raise AgentStuck(stuck)
        await self._save()

    async def _tool_complete(self, call: ToolCallRequest, result: ToolResult) -> None:
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

    async def _stop(self, note: str) -> None:
        close_open_tool_calls(self.messages, note)
        await self._save()

    async def _close_cancelled(self) -> None:
        """Leave a conversation the next task can continue from, then let the cancel go on."""
        if self._partial:
            # The user saw this text stream; keep it so the model knows what it already said.
            self.messages.append({"role": "assistant", "content": "".join(self._partial)})
        timed_out = self._deadline is not None and self._deadline.expired()
        note = "stopped: the task ran out of time (TASK_TIMEOUT)" if timed_out else CANCELLED
        close_open_tool_calls(self.messages, note)
        await self._save()
        for call in self._running:
            await self._tool_complete(call, ToolResult(note, is_error=True))

    async def _save(self) -> None:
        # A snapshot: the caller may keep it while the run goes on appending.
        await self.save(list(self.messages))


async def _ignore(text: str) -> None:
    return None
