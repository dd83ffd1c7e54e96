"""One error root with a stable code, a human message and a context dict.

The API layer maps each subclass to an HTTP status; nothing here knows about HTTP.
`ToolError` is different in kind: it is told to the model, which can act on it, and
never ends a task by itself.
"""

from __future__ import annotations

from typing import Any


class CrogiaError(Exception):
    """Base of every error Crogia raises on purpose."""

    code = "error"

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context


class InvalidInput(CrogiaError):
    """The request itself is wrong (bad path, bad regex, bad value)."""

    code = "invalid_input"


class NotFound(CrogiaError):
    """Unknown session, task, file or process (also another tenant's)."""

    code = "not_found"


class Conflict(CrogiaError):
    """The request clashes with the current state (session stopped, file exists...)."""

    code = "conflict"


class TooLarge(CrogiaError):
    """A body, file or output is larger than the configured limit."""

    code = "too_large"


class Unauthorized(CrogiaError):
    """Missing or wrong API token."""

    code = "unauthorized"


class Forbidden(CrogiaError):
    """Not allowed on this server whoever asks (an image outside SANDBOX_IMAGES)."""

    code = "forbidden"


class Unavailable(CrogiaError):
    """A dependency is down: Docker engine unreachable, sandbox image missing, executor gone."""

    code = "unavailable"


class SandboxError(CrogiaError):
    """The sandbox failed in a way that is not the caller's fault."""

    code = "sandbox_error"


class UpstreamTimeout(SandboxError):
    """A server inside the sandbox did not answer in time (a preview)."""

    code = "upstream_timeout"


class ToolError(Exception):
    """A tool call failed; the message goes back to the model as text it can act on."""
