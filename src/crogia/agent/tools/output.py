"""Keeping what a tool tells the model within a byte budget, and saying so when cut."""

from __future__ import annotations

DEFAULT_MAX_OUTPUT = 16 * 1024
"""Bytes of tool output the model is given per call."""


def kib(limit: int) -> str:
    return f"{limit / 1024:g} KiB"


def fits(text: str, limit: int) -> bool:
    # A str of n characters encodes to at most 4n bytes: most outputs skip the encode.
    return len(text) * 4 <= limit or len(text.encode()) <= limit


def cap_middle(text: str, limit: int, *, stated: int | None = None) -> str:
    """Keep the start and the end, cut the middle; shell output has its errors at the end.

    `stated` is the cap named in the marker when `limit` leaves room for text added after.
    """
    if fits(text, limit):
        return text
    data = text.encode()
    keep = max(0, limit - 160)  # room for the marker
    head = data[: keep // 2].decode(errors="ignore")
    tail = data[len(data) - keep // 2 :].decode(errors="ignore")
    cut = len(data) - len(head.encode()) - len(tail.encode())
    marker = f"[... {cut} bytes cut from the middle: tool output is capped at {kib(stated or limit)} ...]"
    return f"{head}\n{marker}\n{tail}"


def take_lines(lines: list[str], limit: int) -> int:
    """How many of `lines` (joined with newlines) fit in `limit` bytes; at least one."""
    used = 0
    for count, line in enumerate(lines):
        used += len(line.encode()) + 1
        if used > limit:
            return max(1, count)
    return len(lines)


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"
