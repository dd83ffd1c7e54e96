"""What the server accepts from a (possibly compromised) daemon about terminals, and the scrollback ring."""

from __future__ import annotations

from typing import Any, cast

import pytest

from crogia.sandbox.daemon import executor_proto as proto
from crogia.sandbox.executor_client import ByteStream
from crogia.sandbox.pty_channel import ProtocolError, PtyExit, PtyRouter, parse_push
from crogia.services.terminals import Scrollback


@pytest.mark.parametrize(
    "push",
    [
        {"type": "pty_output", "tid": 5, "data_b64": "eA=="},  # bytes ride in frames, never in JSON
        {"type": "pty_exit", "tid": True, "exit_code": 0},
        {"type": "pty_exit", "tid": "5", "exit_code": 0},
        {"type": "pty_exit", "tid": 1 << 40, "exit_code": 0},
        {"type": "pty_exit", "exit_code": 0},
        {"type": "pty_exit", "tid": 5, "exit_code": "3"},
        {"type": "pty_exit", "tid": 5, "exit_code": 1.5},
    ],
)
def test_malformed_pushes_are_protocol_errors(push: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        parse_push(push)
    if push["type"] == "pty_output":
        with pytest.raises(ProtocolError):  # the reader refuses it before any terminal code sees it
            proto.check_message(push)


def test_a_well_formed_exit_is_fine() -> None:
    assert parse_push({"type": "pty_exit", "tid": 5, "exit_code": None}) == PtyExit(5, None)
    assert parse_push({"type": "pty_exit", "tid": 5, "exit_code": 3}) == PtyExit(5, 3)


class Recorder:
    def __init__(self) -> None:
        self.got: list[object] = []

    def on_output(self, data: bytes) -> None:
        self.got.append(data)

    def on_exit(self, exit_code: int | None) -> None:
        self.got.append(("exit", exit_code))

    def on_lost(self) -> None:
        self.got.append("lost")


class FakeStream:
    def __init__(self) -> None:
        self.aborted = 0

    def abort(self) -> None:
        self.aborted += 1


def _stream(fake: FakeStream) -> ByteStream:
    return cast(Any, fake)


def test_exits_before_the_open_reply_are_kept_only_while_an_open_is_in_flight() -> None:
    router = PtyRouter()
    router.dispatch({"type": "pty_exit", "tid": 6, "exit_code": 1})  # nobody is opening: dropped
    router.opening = 1
    router.dispatch({"type": "pty_exit", "tid": 7, "exit_code": 3})
    router.opening = 0
    term, stream = Recorder(), FakeStream()
    router.register(7, term, _stream(stream))
    assert term.got == [("exit", 3)] and stream.aborted == 1 and router.stream(7) is None
    late = Recorder()
    router.register(6, late, _stream(FakeStream()))
    assert late.got == []
    router.dispatch({"type": "pty_exit", "tid": 6, "exit_code": 0})
    router.dispatch({"type": "pty_exit", "tid": 6, "exit_code": 9})  # a second exit: nobody hears it
    assert late.got == [("exit", 0)]
    other, kept = Recorder(), FakeStream()
    router.register(8, other, _stream(kept))
    assert router.stream(8) is _stream(kept)
    router.end_all()
    assert other.got == ["lost"] and router.stream(8) is None


def test_scrollback_keeps_the_newest_bytes_and_a_slow_reader_skips_ahead() -> None:
    ring = Scrollback(10)
    ring.append(b"0123456789")
    offset, data = ring.read(0, 4)
    assert (offset, data) == (4, b"0123")
    ring.append(b"abcdef")  # the oldest 6 bytes go: the reader at 4 lost "456789"... partly
    assert ring.start == 6 and ring.end == 16
    offset, data = ring.read(offset, 100)
    assert (offset, data) == (16, b"6789abcdef")
