"""Shell and background-process tools: thin calls into the `ToolHost`."""

from __future__ import annotations

from typing import Any

from crogia.agent.host import ProcessView
from crogia.agent.tools.output import cap_middle
from crogia.agent.tools.registry import Param, Tool, ToolContext
from crogia.errors import ToolError

_PID = Param("integer", "Process id returned by start_process.", required=True)


async def run_shell(ctx: ToolContext, args: dict[str, Any]) -> str:
    timeout = args.get("timeout")
    if timeout is not None and timeout <= 0:
        raise ToolError("timeout must be a positive number of seconds")
    result = await ctx.host.run_shell(args["cmd"], timeout=timeout)
    notes = [f"[exit code: {result.exit_code}]"]
    if result.timed_out:
        notes.append("[timed out: the command was killed; use start_process for long-running commands]")
    if result.truncated:
        notes.append("[the sandbox cut the middle of a very long output]")
    # Cap the output alone so the exit code and notes always reach the model.
    output = (
        cap_middle(result.output, ctx.max_output - 300, stated=ctx.max_output)
        if result.output
        else "(no output)"
    )
    return "\n".join([output.rstrip("\n"), *notes])


async def start_process(ctx: ToolContext, args: dict[str, Any]) -> str:
    view = await ctx.host.start_process(args["cmd"])
    return (
        f"Started pid {view.pid}: {view.cmd}\nLog: {view.log}\n"
        f"Read its output with tail_log(pid={view.pid}); stop it with stop_process(pid={view.pid})."
    )


async def stop_process(ctx: ToolContext, args: dict[str, Any]) -> str:
    view = await ctx.host.stop_process(args["pid"])
    return f"Process {view.pid} is {view.status}{_exit(view)}."


async def list_processes(ctx: ToolContext, args: dict[str, Any]) -> str:
    views = await ctx.host.list_processes()
    if not views:
        return "No processes were started in this session."
    return "\n".join(f"pid {v.pid}\t{v.status}{_exit(v)}{_ports(v)}\t{v.cmd}" for v in views)


def _ports(view: ProcessView) -> str:
    return "\tlistening on port " + ", ".join(map(str, view.ports)) if view.ports else ""


async def tail_log(ctx: ToolContext, args: dict[str, Any]) -> str:
    lines = args.get("lines", 50)
    if lines < 1:
        raise ToolError("lines must be at least 1")
    text = await ctx.host.tail_log(args["pid"], lines)
    return text or f"(the log of process {args['pid']} is empty so far)"


def _exit(view: ProcessView) -> str:
    return f" (exit code {view.exit_code})" if view.exit_code is not None else ""


SHELL_TOOLS = (
    Tool(
        "run_shell",
        "Run a bash command in the sandbox with cwd /workspace and wait for it. Returns its output and exit "
        "code. It is killed at the timeout, and what it starts in the background ends with it: use "
        "start_process for servers and other long-running commands.",
        {
            "cmd": Param("string", "The bash command line.", required=True),
            "timeout": Param("number", "Seconds before the command is killed; the server bounds it."),
        },
        run_shell,
    ),
    Tool(
        "start_process",
        "Start a long-running command (a server, a watcher, a long build) in the background. "
        "Returns its pid and log path; read the log with tail_log.",
        {"cmd": Param("string", "The bash command line.", required=True)},
        start_process,
    ),
    Tool(
        "stop_process",
        "Stop a background process and its children (SIGTERM, then SIGKILL).",
        {"pid": _PID},
        stop_process,
    ),
    Tool(
        "list_processes",
        "List this session's background processes with their status and the TCP ports they listen on.",
        {},
        list_processes,
    ),
    Tool(
        "tail_log",
        "The last lines of a background process's combined stdout/stderr log.",
        {"pid": _PID, "lines": Param("integer", "How many lines; default 50.")},
        tail_log,
    ),
)
