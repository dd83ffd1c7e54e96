"""Helpers for agent tests: event/save recorder, conversation checks, a run shortcut."""

from __future__ import annotations

from typing import Any

from crogia.agent.loop import Agent, ContextView, RunOutcome
from crogia.events import Event
from tests.agent.local_host import LocalToolHost

MODEL = "scripted-model"


class Recorder:
    """Collects what a run emits and saves, as the services layer would."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.saved: list[list[dict[str, Any]]] = []
        self.views: list[ContextView] = []

    async def emit(self, event: Event) -> None:
        self.events.append(event)

    async def save(self, messages: list[dict[str, Any]]) -> None:
        self.saved.append(messages)

    async def save_view(self, view: ContextView) -> None:
        self.views.append(view)

    @property
    def conversation(self) -> list[dict[str, Any]]:
        """The last saved conversation."""
        return self.saved[-1]

    def types(self) -> list[str]:
        return [event.type for event in self.events]

    def of_type(self, kind: str) -> list[Any]:
        return [event for event in self.events if event.type == kind]


def assert_valid_conversation(messages: list[dict[str, Any]]) -> None:
    """What OpenAI requires: each assistant tool call answered once, right after it."""
    open_ids: list[str] = []
    for message in messages:
        if message["role"] == "tool":
            assert message["tool_call_id"] in open_ids, f"tool message answers no open call: {message}"
            open_ids.remove(message["tool_call_id"])
            continue
        assert not open_ids, f"tool calls {open_ids} unanswered before {message}"
        if message["role"] == "assistant":
            open_ids = [call["id"] for call in message.get("tool_calls") or []]
    assert not open_ids, f"tool calls {open_ids} unanswered at the end"


async def run_task(
    agent: Agent,
    task: str,
    host: LocalToolHost,
    recorder: Recorder,
    history: list[dict[str, Any]] | None = None,
    view: ContextView | None = None,
) -> RunOutcome:
    return await agent.run(
        task,
        history or [],
        host,
        emit=recorder.emit,
        save=recorder.save,
        task_id="task-1",
        view=view,
        save_view=recorder.save_view,
    )
