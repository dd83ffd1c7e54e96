"""Tool declarations, argument checking and dispatch.

Every failure a tool call can meet (unknown name, bad JSON, a missing or wrong-typed
parameter, a `ToolError` or `CrogiaError` from the host, even an unexpected exception)
comes back as a `ToolResult` with `is_error=True` and a message the model can act on.
Only cancellation passes through.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from crogia.agent.host import ToolHost
from crogia.agent.tools.output import DEFAULT_MAX_OUTPUT, cap_middle
from crogia.errors import CrogiaError, ToolError

log = logging.getLogger(__name__)

ParamType = Literal["string", "integer", "number", "boolean"]


@dataclass(frozen=True, slots=True)
class Param:
    type: ParamType
    description: str
    required: bool = False


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What a tool handler works with."""

    host: ToolHost
    max_output: int


Handler = Callable[[ToolContext, dict[str, Any]], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    params: Mapping[str, Param]
    handler: Handler

    def schema(self) -> dict[str, Any]:
        """The Chat Completions `tools` entry."""
        properties = {name: {"type": p.type, "description": p.description} for name, p in self.params.items()}
        required = [name for name, p in self.params.items() if p.required]
        parameters = {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": False,
        }
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": parameters},
        }

    def signature(self) -> str:
        """`name(a, b?)`, used in error messages so the model can correct its call."""
        args = ", ".join(name if p.required else f"{name}?" for name, p in self.params.items())
        return f"{self.name}({args})"


@dataclass(frozen=True, slots=True)
class ToolResult:
    output: str
    """What the model is given (already capped)."""
    is_error: bool = False


class Toolbox:
    """A fixed set of tools; their JSON schemas are built once, here."""

    def __init__(self, tools: Iterable[Tool], *, max_output: int = DEFAULT_MAX_OUTPUT) -> None:
        self.tools = {tool.name: tool for tool in tools}
        self.max_output = max_output
        self.schemas: list[dict[str, Any]] = [tool.schema() for tool in self.tools.values()]

    async def call(self, host: ToolHost, name: str, arguments: str) -> ToolResult:
        """Run one tool call; never raises except for cancellation."""
        tool = self.tools.get(name)
        if tool is None:
            return self._error(f"unknown tool {name!r}. Available tools: {', '.join(self.tools)}.")
        try:
            args = check_arguments(tool, arguments)
            output = await tool.handler(ToolContext(host, self.max_output), args)
        except ToolError as exc:
            return self._error(str(exc))
        except CrogiaError as exc:
            return self._error(exc.message)
        except Exception as exc:
            # A bug or an unforeseen host failure: log it for us, keep host details from the model.
            log.exception("tool %s failed unexpectedly", name)
            return self._error(f"{name} failed unexpectedly ({type(exc).__name__}); try another way.")
        return ToolResult(cap_middle(output, self.max_output))

    def _error(self, message: str) -> ToolResult:
        return ToolResult(cap_middle(f"Error: {message}", self.max_output), is_error=True)


def check_arguments(tool: Tool, arguments: str) -> dict[str, Any]:
    """Parse and type-check the model's argument text against `tool`; raise `ToolError`."""
    try:
        # Some models send "" for a tool without parameters.
        args = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as exc:
        raise ToolError(
            f"the arguments are not valid JSON ({exc.msg} at character {exc.pos}); "
            f"send one JSON object for {tool.signature()}"
        ) from None
    if not isinstance(args, dict):
        raise ToolError(f"the arguments must be a JSON object for {tool.signature()}")
    unknown = sorted(set(args) - set(tool.params))
    if unknown:
        raise ToolError(f"unknown parameter(s) {', '.join(unknown)}; the tool is {tool.signature()}")
    checked: dict[str, Any] = {}
    for name, param in tool.params.items():
        value = args.get(name)
        if value is None:
            if param.required:
                raise ToolError(
                    f"missing required parameter {name!r} ({param.type}); the tool is {tool.signature()}"
                )
            continue
        checked[name] = _coerce(name, param.type, value)
    return checked


def _coerce(name: str, kind: ParamType, value: object) -> Any:
    if kind == "string" and isinstance(value, str):
        return value
    if kind == "boolean" and isinstance(value, bool):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        if kind == "number":
            return float(value)
        if kind == "integer" and float(value).is_integer():
            return int(value)
    article = "an" if kind[0] in "aeiou" else "a"
    raise ToolError(
        f"parameter {name!r} must be {article} {kind}, not {_json_type(value)} {json.dumps(value)[:40]}"
    )


def _json_type(value: object) -> str:
    names = {bool: "boolean", str: "string", int: "integer", float: "number", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)
