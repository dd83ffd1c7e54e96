"""The tools the model is offered (names and parameters are part of the API contract)."""

from __future__ import annotations

from crogia.agent.tools.files import FILE_TOOLS
from crogia.agent.tools.output import DEFAULT_MAX_OUTPUT
from crogia.agent.tools.registry import Param, Tool, Toolbox, ToolContext, ToolResult, check_arguments
from crogia.agent.tools.shell import SHELL_TOOLS

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "FILE_TOOLS",
    "SHELL_TOOLS",
    "Param",
    "Tool",
    "ToolContext",
    "ToolResult",
    "Toolbox",
    "check_arguments",
    "default_toolbox",
]


def default_toolbox(*, max_output: int = DEFAULT_MAX_OUTPUT) -> Toolbox:
    """Every tool of API.md, in its table's order."""
    return Toolbox((*FILE_TOOLS, *SHELL_TOOLS), max_output=max_output)
