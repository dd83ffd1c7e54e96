"""Event models: what a session's stream carries.

Each event is a small typed model with one `type` literal. The bus (`crogia.bus`) stamps
`session_id`, `seq` and `timestamp` when it stores one, so producers only say what happened.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True)

    task_id: str | None = None
    """Set on events produced by a task."""


class TaskStarted(_Event):
    type: Literal["task_started"] = "task_started"
    task: str


class TextDelta(_Event):
    type: Literal["text_delta"] = "text_delta"
    content: str
    """A piece of the model's streamed text; consecutive pieces may be coalesced."""


class ToolCall(_Event):
    type: Literal["tool_call"] = "tool_call"
    tool_name: str
    arguments: str
    """The JSON-encoded argument string, exactly as the model sent it."""
    call_id: str = ""


class ToolComplete(_Event):
    type: Literal["tool_complete"] = "tool_complete"
    tool_name: str
    output: str
    """What the model was given back (possibly truncated)."""
    call_id: str = ""
    is_error: bool = False


class TaskCompleted(_Event):
    type: Literal["task_completed"] = "task_completed"
    task: str
    usage: dict[str, int] = Field(default_factory=dict)


class ContextCompacted(_Event):
    type: Literal["context_compacted"] = "context_compacted"
    tokens_before: int
    tokens_after: int
    strategy: str
    """`truncate_tool_outputs` or `summarize`, with `+truncate_recent` when the last turns were cut too."""


class TaskFailed(_Event):
    type: Literal["task_failed"] = "task_failed"
    task: str
    message: str


class TaskCancelled(_Event):
    type: Literal["task_cancelled"] = "task_cancelled"
    task: str


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    message: str


class ProcessStarted(_Event):
    type: Literal["process_started"] = "process_started"
    pid: int
    cmd: str
    log: str


class ProcessExited(_Event):
    type: Literal["process_exited"] = "process_exited"
    pid: int
    exit_code: int | None
    status: Literal["exited", "stopped"]


class EgressBlocked(_Event):
    type: Literal["egress_blocked"] = "egress_blocked"
    destination: str
    """What the sandbox was refused: a name it asked to resolve, or the `address:port` it tried."""


class PortOpened(_Event):
    type: Literal["port_opened"] = "port_opened"
    port: int
    """Something started listening on this TCP port inside the sandbox (see GET .../ports)."""


class PortClosed(_Event):
    type: Literal["port_closed"] = "port_closed"
    port: int


Event = Annotated[
    TaskStarted
    | TextDelta
    | ToolCall
    | ToolComplete
    | TaskCompleted
    | ContextCompacted
    | TaskFailed
    | TaskCancelled
    | ErrorEvent
    | ProcessStarted
    | ProcessExited
    | EgressBlocked
    | PortOpened
    | PortClosed,
    Field(discriminator="type"),
]

EventAdapter: TypeAdapter[Event] = TypeAdapter(Event)

SANDBOX_DRIVEN: tuple[str, ...] = ("egress_blocked", "port_opened", "port_closed")
"""Kinds the sandbox sets off at its own pace (each rate-limited where it starts). The store keeps
only a session's newest SANDBOX_EVENTS_KEPT of them, so a long-lived sandbox's sustained rate never
adds up to an unbounded total; what the agent and the user do is never trimmed. The trim's partial
index (migration 0004) names the same kinds."""


def event_payload(event: _Event) -> dict[str, Any]:
    """The event's own fields as JSON-ready data (no routing stamps)."""
    return event.model_dump(mode="json", exclude_none=True)
