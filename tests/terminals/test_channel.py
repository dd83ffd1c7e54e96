"""What the server accepts from a (possibly compromised) daemon about terminals, and the scrollback ring."""

from __future__ import annotations

import base64

import pytest

from crogia.sandbox.pty_channel import OUTPUT_MAX, ProtocolError, PtyOutput, PtyRouter, parse_push
from crogia.services.terminals import Scrollback


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "push",
    [
        {"type": "pty_output", "tid": 5, "data_b64": b64(b"x" * (OUTPUT_MAX + 1))},  # over 64 KiB
        {"type": "pty_output", "tid": 5, "data_b64": "not base64!"},
        {"type": "pty_output", "tid": 5, "data_b64": 12},
        {"type": "pty_output", "tid": True, "data_b64": ""},
        {"type": "pty_output", "tid": "5", "data_b64": ""},
        {"type": "pty_output", "tid": 1 << 40, "data_b64": ""},
        {"type": "pty_exit", "tid": 5, "exit_code": "3"},
    ],
)
def test_malformed_pushes_are_protocol_errors(push: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        parse_push(push)


def test_a_full_size_push_is_fine() -> None:
    assert (
        parse_push({"type": "pty_output", "tid": 5, "data_b64": b64(b"y" * OUTPUT_MAX)}).data
        == b"y" * OUTPUT_MAX
    )


class Recorder:
    def __init__(self) -> None:
        self.got: list[object] = []

    def on_output(self, data: bytes) -> None:
        self.got.append(data)

    def on_exit(self, exit_code: int | None) -> None:
        self.got.append(("exit", exit_code))

    def on_lost(self) -> None:
        self.got.append("lost")


def test_pushes_before_the_open_reply_are_kept_only_while_an_open_is_in_flight() -> None:
    router = PtyRouter()
    router.dispatch({"type": "pty_output", "tid": 7, "data_b64": b64(b"stray")})  # nobody is opening: dropped
    router.opening = 1
    router.dispatch({"type": "pty_output", "tid": 7, "data_b64": b64(b"prompt$ ")})
    router.opening = 0
    term = Recorder()
    router.register(7, term)
    router.dispatch({"type": "pty_exit", "tid": 7, "exit_code": 3})
    router.dispatch({"type": "pty_output", "tid": 7, "data_b64": b64(b"late")})  # after its exit: dropped
    assert term.got == [b"prompt$ ", ("exit", 3)]
    other = Recorder()
    router.register(8, other)
    router.end_all()
    assert other.got == ["lost"]
    assert isinstance(parse_push({"type": "pty_output", "tid": 1, "data_b64": ""}), PtyOutput)


def test_scrollback_keeps_the_newest_bytes_and_a_slow_reader_skips_ahead() -> None:
    ring = Scrollback(10)
    ring.append(b"0123456789")
    offset, data = ring.read(0, 4)
    assert (offset, data) == (4, b"0123")
    ring.append(b"abcdef")  # the oldest 6 bytes go: the reader at 4 lost "456789"... partly
    assert ring.start == 6 and ring.end == 16
    offset, data = ring.read(offset, 100)
    assert (offset, data) == (16, b"6789abcdef")
