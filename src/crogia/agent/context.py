"""The context budget of one run: how many tokens the next request holds, and compacting it.

The count is the server's own figure for what it last saw (prompt + completion tokens of the
last reply) plus an estimate for what was appended since; before the first reply, or from a
server that reports no usage, it is an estimate of everything. Appends are counted once, so
the check costs next to nothing per turn.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from crogia.agent.compaction import (
    ContextView,
    estimate_all,
    is_summary,
    recent_start,
    shorten_tool_outputs,
    summarisable,
    summary_message,
)
from crogia.agent.errors import ContextOverflow
from crogia.agent.stream import TurnUsage

Summarise = Callable[[list[dict[str, Any]]], Awaitable[str]]
"""Turns the older part of the view into summary text (one model call)."""


@dataclass(frozen=True, slots=True)
class ContextSettings:
    input_tokens: int
    """What the prompt may hold (the window minus the output budget)."""
    compact_at: float = 0.8
    keep_turns: int = 3
    """The last turns that are never shortened or summarised."""
    keep_chars: int = 2000
    """What is left of an old tool output: its first and last halves of this."""
    max_compactions: int = 5
    """Per task: past it the task fails instead of compacting in circles."""

    @property
    def threshold(self) -> int:
        return int(self.input_tokens * self.compact_at)


@dataclass(frozen=True, slots=True)
class Compaction:
    tokens_before: int
    tokens_after: int
    strategy: str


class ContextKeeper:
    """Owns the view of `full` (the run's message list, appended to by the run)."""

    def __init__(
        self, full: list[dict[str, Any]], view: ContextView, settings: ContextSettings, fixed_tokens: int
    ) -> None:
        self.full, self.view, self.settings = full, view, settings
        self.fixed_tokens = fixed_tokens
        """System prompt and tool schemas: sent every time, never compacted."""
        self.compactions = 0
        self._base_tokens = fixed_tokens + estimate_all(view.apply(full))
        self._base_len = len(full)

    def messages(self) -> list[dict[str, Any]]:
        return self.view.apply(self.full)

    def observe(self, usage: TurnUsage | None) -> None:
        """After a reply was appended: the server's count replaces the estimate up to here."""
        if usage is not None and usage.prompt:
            self._base_tokens = usage.prompt + usage.completion
            self._base_len = len(self.full)

    def tokens(self) -> int:
        """What the next request will hold, in tokens."""
        if len(self.full) > self._base_len:
            self._base_tokens += estimate_all(self.full[self._base_len :])
            self._base_len = len(self.full)
        return self._base_tokens

    def over(self) -> bool:
        return self.tokens() > self.settings.threshold

    async def compact(self, summarise: Summarise, *, forced: bool = False) -> Compaction:
        """Shrink the view (cheapest step first); raise `ContextOverflow` when it cannot."""
        settings = self.settings
        if self.compactions >= settings.max_compactions:
            raise ContextOverflow(
                f"the conversation outgrew the model's window again after {self.compactions} "
                "compactions in this task (CONTEXT_MAX_COMPACTIONS); "
                "start a new session or raise MODEL_CONTEXT_TOKENS"
            )
        before = self.tokens()
        target = int(settings.threshold * 0.6)  # well under the threshold: no compaction next turn
        view = self.messages()
        keep_from = recent_start(view, settings.keep_turns)
        new, _ = shorten_tool_outputs(view, before=keep_from, keep_chars=settings.keep_chars)
        strategy = "truncate_tool_outputs"
        if self._size(new) > target or forced:
            old = new[:keep_from]
            if summarisable(old):
                new = [*_summarised(old, await summarise(old)), *new[keep_from:]]
                strategy = "summarize"
        if self._size(new) > settings.threshold:
            new, _ = shorten_tool_outputs(new, before=len(new), keep_chars=settings.keep_chars)
            strategy += "+truncate_recent"
        after = self._size(new)
        if after >= before:
            raise ContextOverflow(
                "the conversation does not fit the model's window and nothing is left to compact"
            )
        self.compactions += 1
        self.view = ContextView(head=new, covers=len(self.full))
        self._base_tokens, self._base_len = after, len(self.full)
        return Compaction(before, after, strategy)

    def _size(self, messages: list[dict[str, Any]]) -> int:
        return self.fixed_tokens + estimate_all(messages)


def _summarised(old: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """The summary, then the latest user request verbatim (the task in hand must not blur)."""
    requests = [m for m in old if m.get("role") == "user" and not is_summary(m)]
    return [summary_message(text), *requests[-1:]]
