"""The daemon's streamed output (`LiveStream`): over its rate budget, a command's last lines still arrive."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

DAEMON = Path(__file__).parents[2] / "src" / "crogia" / "sandbox" / "daemon"


@pytest.fixture(scope="module")
def executor_exec() -> ModuleType:
    """The daemon's module as the daemon imports it (its siblings are top-level modules there)."""
    sys.path.insert(0, str(DAEMON))
    try:
        return importlib.import_module("executor_exec")
    finally:
        sys.path.remove(str(DAEMON))


class Connection:
    """What `LiveStream` needs of the daemon's connection: its unsent bytes and `send`."""

    def __init__(self) -> None:
        self.outbuf = bytearray()
        self.sent: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def text(self) -> str:
        return "".join(str(message["data"]) for message in self.sent)


def run(executor_exec: ModuleType, chunks: list[bytes]) -> str:
    conn = Connection()
    stream = executor_exec.LiveStream(conn, 1, 16, 0.0)  # a 16-byte burst, then nothing per second
    for chunk in chunks:
        stream.feed(chunk)
    stream.finish()
    return conn.text()


def test_the_last_line_arrives_when_the_budget_is_spent(executor_exec: ModuleType) -> None:
    text = run(executor_exec, [b"0123456789abcdef", b"y" * 100_000, b"\nthe end\n"])
    assert text.startswith("0123456789abcdef\n[... ") and text.endswith("\nthe end\n")
    skipped = int(text.split("[... ")[1].split(" bytes")[0])
    tail = text.split("...]\n", 1)[1]
    assert skipped + len(tail) == 100_009 and len(tail) <= executor_exec.TAIL_CHARS  # counted once


def test_output_within_the_budget_is_streamed_whole(executor_exec: ModuleType) -> None:
    assert run(executor_exec, [b"hello ", b"world\n"]) == "hello world\n"


def test_a_character_split_over_the_last_chunk_is_kept(executor_exec: ModuleType) -> None:
    euro = "€".encode()
    assert run(executor_exec, [b"x" * 16, b"y" * 50 + euro[:2], euro[2:] + b"\n"]).endswith("y€\n")
