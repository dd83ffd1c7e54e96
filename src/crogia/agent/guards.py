"""Which tool calls may run together, and the guard against a model repeating a failing call."""

from __future__ import annotations

from crogia.agent.stream import ToolCallRequest
from crogia.agent.tools import ToolResult

READ_ONLY = frozenset({"read_file", "list_directory", "search_files", "grep", "tail_log", "list_processes"})
"""Tools that change nothing: several in one turn run concurrently."""
WARN_AT = 3
STOP_AT = 5


def batches(calls: list[ToolCallRequest]) -> list[list[ToolCallRequest]]:
    """`calls` in order, consecutive read-only calls grouped; any other call is a batch alone."""
    groups: list[list[ToolCallRequest]] = []
    for call in calls:
        if call.name in READ_ONLY and groups and groups[-1][0].name in READ_ONLY:
            groups[-1].append(call)
        else:
            groups.append([call])
    return groups


class StuckGuard:
    """Counts the same failing call (same tool, same arguments, same error) made in a row."""

    def __init__(self) -> None:
        self._last: tuple[str, str, str] | None = None
        self.repeats = 0

    def check(self, call: ToolCallRequest, result: ToolResult) -> tuple[str, str | None]:
        """(the output to give the model, a reason to stop the task or None)."""
        if not result.is_error:
            self._last, self.repeats = None, 0
            return result.output, None
        key = (call.name, call.arguments, result.output)
        self.repeats = self.repeats + 1 if key == self._last else 1
        self._last = key
        if self.repeats >= STOP_AT:
            reason = (
                f"the model made the same failing call {self.repeats} times in a row "
                f"({call.name} with the same arguments, same error: {result.output[:200]})"
            )
            return result.output, reason
        if self.repeats >= WARN_AT:
            note = (
                f"\n\nThis exact call has now failed {self.repeats} times in a row with the same error. "
                "Repeating it will not help: change the arguments or try a different approach. "
                f"After {STOP_AT} identical failures the task is stopped."
            )
            return result.output + note, None
        return result.output, None
