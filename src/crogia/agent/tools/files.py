"""File and search tools: thin calls into `host.files` (paths relative to /workspace)."""

from __future__ import annotations

from typing import Any

from crogia.agent.tools.output import kib, plural, take_lines
from crogia.agent.tools.registry import Param, Tool, ToolContext
from crogia.errors import ToolError

_PATH = Param("string", "Path relative to the workspace root (/workspace).", required=True)
_DIR = Param("string", "Folder relative to the workspace root; default '.'.")


async def read_file(ctx: ToolContext, args: dict[str, Any]) -> str:
    text = await ctx.host.files.read(args["path"])
    lines = text.splitlines()
    start, end = args.get("start_line"), args.get("end_line")
    if start is None and end is None:
        return _whole_file(text, lines, ctx.max_output)
    first = 1 if start is None else start
    last = len(lines) if end is None else min(end, len(lines))
    if first < 1 or (end is not None and end < first):
        raise ToolError("start_line must be >= 1 and end_line >= start_line (lines count from 1)")
    if first > len(lines):
        raise ToolError(
            f"start_line {first} is past the end: {args['path']} has {plural(len(lines), 'line')}"
        )
    numbered = [f"{n:>6}\t{line}" for n, line in enumerate(lines[first - 1 : last], start=first)]
    shown = take_lines(numbered, ctx.max_output - 200)
    body = "\n".join(numbered[:shown])
    if shown < len(numbered):
        stop = first + shown - 1
        body += f"\n[output capped at {kib(ctx.max_output)}: continue with start_line={stop + 1}]"
    return body


def _whole_file(text: str, lines: list[str], limit: int) -> str:
    if not text:
        return "(empty file)"
    shown = take_lines(lines, limit - 200)
    if shown == len(lines):
        return text
    return "\n".join(lines[:shown]) + (
        f"\n[output capped at {kib(limit)}: showing lines 1-{shown} of {len(lines)}; "
        f"read the rest with start_line={shown + 1} and end_line]"
    )


async def write_file(ctx: ToolContext, args: dict[str, Any]) -> str:
    written = await ctx.host.files.write(args["path"], args["content"])
    return f"Wrote {plural(written, 'byte')} to {args['path']}."


async def edit_file(ctx: ToolContext, args: dict[str, Any]) -> str:
    path, old, new = args["path"], args["old_text"], args["new_text"]
    if not old:
        raise ToolError("old_text is empty; give the exact text to replace")
    text = await ctx.host.files.read(path)
    count = text.count(old)
    if count == 0:
        raise ToolError(
            f"old_text was not found in {path}; read the file and copy the text exactly (whitespace included)"
        )
    if count > 1:
        raise ToolError(
            f"old_text occurs {count} times in {path}; "
            "include more surrounding lines so it matches exactly once"
        )
    at = text.index(old)
    await ctx.host.files.write(path, text[:at] + new + text[at + len(old) :])
    return f"Replaced 1 occurrence in {path} at line {text.count(chr(10), 0, at) + 1}."


async def list_directory(ctx: ToolContext, args: dict[str, Any]) -> str:
    entries = await ctx.host.files.list(args.get("path", "."))
    if not entries:
        return "(empty directory)"
    rows = []
    for entry in sorted(entries, key=lambda e: (e.type != "directory", e.name)):
        if entry.type == "directory":
            rows.append(f"{entry.name}/\tdirectory")
        else:
            rows.append(f"{entry.name}\t{entry.type}\t{plural(entry.size or 0, 'byte')}")
    if entries.truncated:
        rows.append(f"[only the first {len(entries)} entries are listed]")
    return "\n".join(rows)


async def search_files(ctx: ToolContext, args: dict[str, Any]) -> str:
    result = await ctx.host.files.search(args["pattern"], args.get("path", "."))
    if not result.matches:
        return f"No files match {args['pattern']!r}."
    more = "\n[more matches were left out: narrow the pattern or the path]" if result.truncated else ""
    return "\n".join(result.matches) + more


async def grep(ctx: ToolContext, args: dict[str, Any]) -> str:
    result = await ctx.host.files.grep(
        args["pattern"], args.get("path", "."), file_types=args.get("file_types", "*")
    )
    if not result.matches:
        return f"No lines match {args['pattern']!r}."
    rows = [f"{m.file}:{m.line}: {m.content[:400]}" for m in result.matches]
    more = (
        "\n[more matches were left out: narrow the pattern, path or file_types]" if result.truncated else ""
    )
    return "\n".join(rows) + more


FILE_TOOLS = (
    Tool(
        "read_file",
        "Read a text file of the workspace. With start_line/end_line, returns that range with line numbers.",
        {
            "path": _PATH,
            "start_line": Param("integer", "First line to read, counting from 1."),
            "end_line": Param("integer", "Last line to read (inclusive)."),
        },
        read_file,
    ),
    Tool(
        "write_file",
        "Create or overwrite a file with the given content, creating parent folders.",
        {"path": _PATH, "content": Param("string", "The complete new content of the file.", required=True)},
        write_file,
    ),
    Tool(
        "edit_file",
        "Replace exactly one occurrence of old_text with new_text in a file. Fails if old_text is absent "
        "or occurs more than once: then include more surrounding text.",
        {
            "path": _PATH,
            "old_text": Param("string", "The exact text to replace, whitespace included.", required=True),
            "new_text": Param("string", "The replacement text.", required=True),
        },
        edit_file,
    ),
    Tool(
        "list_directory",
        "List a folder of the workspace: each entry with its type and size.",
        {"path": _DIR},
        list_directory,
    ),
    Tool(
        "search_files",
        "Find workspace files whose path matches a glob pattern such as '*.py' or 'src/**/test_*.py'.",
        {"pattern": Param("string", "Glob pattern.", required=True), "path": _DIR},
        search_files,
    ),
    Tool(
        "grep",
        "Search file contents for a regular expression; returns file:line: text for each matching line.",
        {
            "pattern": Param("string", "Regular expression to search for.", required=True),
            "path": _DIR,
            "file_types": Param(
                "string", "Comma-separated globs of files to search, e.g. '*.py,*.md'; default all."
            ),
        },
        grep,
    ),
)
