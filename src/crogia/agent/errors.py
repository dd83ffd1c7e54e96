"""Errors that end an agent run.

These are "the run failed" errors. A failing tool is different: its message goes back to the
model as a tool result (see `crogia.agent.tools`) and the run goes on.
"""

from __future__ import annotations

from crogia.errors import CrogiaError


class AgentError(CrogiaError):
    """The agent run could not finish; `message` says why in words a user can act on."""

    code = "agent_error"


class AgentNotConfigured(AgentError):
    """No model name or no API key: nothing was sent to any server."""

    code = "agent_not_configured"


class MaxTurnsExceeded(AgentError):
    """The model kept calling tools past the configured number of turns."""

    code = "max_turns_exceeded"


class ModelError(AgentError):
    """The model server refused the request, or kept failing after every retry."""

    code = "model_error"


class ContextOverflow(ModelError):
    """The server answered that the conversation does not fit the model's context window."""

    code = "context_length_exceeded"


class TaskLimitReached(AgentError):
    """A per-task budget ran out (TASK_MAX_TOKENS, TASK_TIMEOUT)."""

    code = "task_limit_reached"


class AgentStuck(AgentError):
    """The model repeated the same failing tool call until the stuck guard stopped it."""

    code = "agent_stuck"
