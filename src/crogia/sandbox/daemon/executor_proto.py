"""The server-daemon protocol: its version, its hello, and the shape of every message the server reads.

Shared by both sides (standard library only, Python 3.9+): the daemon imports it by name from its
own folder, the server as `crogia.sandbox.daemon.executor_proto`. The wire is one JSON object per
line (UTF-8), with binary frames between the lines (below). The daemon speaks first, once per
connection:

    daemon -> {"type": "hello", "version": VERSION, "secret": "...", "pid": N}
    server -> {"type": "welcome", "version": VERSION}    or {"type": "reject", "error": "..."}

then requests (server -> daemon) and replies, chunks and exit notices (daemon -> server) as
`executor.py` describes.

Bytes (files, terminals, tunnels) travel as binary frames: the byte 0x00 (which never starts a
JSON line), a 4-byte big-endian stream id, a 4-byte big-endian length of at most `FRAME_MAX`, then
that many bytes; length 0 is its sender's end of the stream. A stream's id is the id of the request
that opened it, and it may outlive that request's reply (a terminal's output). Flow control, per
stream and direction: a sender has at most `WINDOW` bytes out that the receiver has not credited;
the receiver credits what it consumed, server -> daemon `{"op": "credit", "stream": N, "bytes": K}`,
daemon -> server `{"type": "credit", ...}` (neither is answered). Either side aborts a stream with
`{"op": "reset", "stream": N}` / `{"type": "reset", "stream": N}`; frames that still arrive for a
stream the receiver does not know are dropped (a race, not an error). More than the window, or a
frame over `FRAME_MAX`, breaks the protocol.

The server trusts nothing it reads: `check_message` accepts only an object of a known `type`
whose fields have the types and ranges below, and the reader bounds every line.

Adding a message: a new op goes in the daemon's `executor.OPS` (name -> handler) and its reply's
values in `RESULTS` here (op -> {field: Field}); the server's `ExecutorClient.request(op, allow=N)`
then checks them (`allow`: how far past `LINE_BASE` its reply may run). A new kind of message the
daemon pushes unasked goes in `PUSHES` (type -> {field: Field}) plus one branch in
`ExecutorClient._dispatch`. Bump `VERSION` when a peer of the other version would misread it.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

VERSION = 5
"""Bumped on any change a peer of the other version would misread; checked in the hello.
5: frames of up to 1 MiB (4: 256 KiB)."""

FRAME = 0
"""The first byte of a binary frame; a JSON line never starts with it."""
FRAME_HEADER = 9
FRAME_MAX = 1024 * 1024
"""Most bytes in one frame: a download through a tunnel costs the server (Python) per frame, and
1 MiB frames took a third of its user CPU off (256 KiB before, protocol 4)."""
WINDOW = 4 * 1024 * 1024
"""Bytes of one stream a sender may have out before the receiver credits them."""
STREAM_MAX = (1 << 32) - 1

PID_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT
SECRET_MAX = 256
TEXT_MAX = 4096
"""Longest error message or command line the server keeps from a reply (longer is cut)."""


class ProtocolError(ValueError):
    """A message that breaks the protocol: the peer is faulty or hostile."""


class Field:
    """One field's type and range: `kind` is a type or tuple of types; None allowed if `optional`."""

    __slots__ = ("hi", "kind", "lo", "optional")

    def __init__(
        self, kind: Any, lo: int | None = None, hi: int | None = None, optional: bool = False
    ) -> None:
        self.kind, self.lo, self.hi, self.optional = kind, lo, hi, optional

    def check(self, name: str, value: Any) -> None:
        if value is None and self.optional:
            return
        # bool is an int in Python, never in this protocol (and the reverse).
        if not isinstance(value, self.kind) or (isinstance(value, bool) and self.kind is not bool):
            raise ProtocolError(f"field {name!r} has the wrong type ({type(value).__name__})")
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise ProtocolError(f"field {name!r} is out of range")


PID = Field(int, 1, PID_MAX)
CODE = Field(int, -255, 255)
TEXT = Field(str)
FLAG = Field(bool)
TIME = Field((int, float), optional=True)

RESULTS: dict[str, dict[str, Field]] = {
    "ping": {"version": Field(int, 0, 1 << 16), "pid": PID},
    "exec": {"exit_code": CODE, "output": TEXT, "timed_out": FLAG, "truncated": FLAG},
    "cancel": {"cancelled": FLAG},
    "spawn": {"pid": PID, "log": TEXT},
    "terminate": {"exit_code": Field(int, -255, 255, optional=True)},
    "tail": {"output": TEXT},
    "list": {"processes": Field(list)},
    "pty_open": {"tid": PID},
    "pty_resize": {},
    "pty_close": {"exit_code": Field(int, 0, 255, optional=True)},
    "ports": {"ports": Field(list)},
    "tunnel_open": {},
    "tunnel_handoff": {"handoff": FLAG, "local": Field(int, 1, 65535)},
    "fs_list": {"entries": Field(list), "truncated": FLAG},
    "fs_stat": {"entry": Field(dict)},
    "fs_mkdir": {},
    "fs_remove": {},
    "fs_rename": {},
    "fs_rg": {"exit_code": CODE, "stderr": TEXT},
    "fs_read": {"size": Field(int, 0, 1 << 62)},
    "fs_write": {"size": Field(int, 0, 1 << 62)},
}
"""Values of a successful reply, by the op of its request."""

PROCESS: dict[str, Field] = {"pid": PID, "running": FLAG, "exit_code": Field(int, -255, 255, optional=True)}
"""Each entry of `list`'s `processes` (other fields of an entry are dropped)."""

PORTS_MAX = 512
PORT: dict[str, Field] = {
    "port": Field(int, 1, 65535),
    "pid": Field(int, 1, PID_MAX, optional=True),
    "pgid": Field(int, 1, PID_MAX, optional=True),
}
"""Each entry of `ports`'s `ports` (at most PORTS_MAX; `address` is kept when a short string)."""
ENTRY: dict[str, Field] = {
    "name": TEXT,
    "path": TEXT,
    "type": TEXT,
    "size": Field(int, 0, 1 << 62, optional=True),
    "mtime": Field((int, float), -(10**11), 10**11),
}
"""Each entry of `fs_list`'s `entries` and `fs_stat`'s `entry` (`check_entry` checks the rest)."""
ENTRY_TYPES = ("file", "directory", "symlink")
NAME_MAX = 1024
PATH_MAX = 1 << 16

PUSHES: dict[str, dict[str, Field]] = {
    "chunk": {"id": Field(int, 0), "data": TEXT},
    "exit": {"pid": PID, "exit_code": CODE},
    # A terminal's bytes are frames on its pty_open stream (`executor_pty.py`); only its end is a push.
    "pty_exit": {"tid": PID, "exit_code": Field(int, 0, 255, optional=True)},
    "credit": {"stream": Field(int, 1, STREAM_MAX), "bytes": Field(int, 1, WINDOW)},
    "reset": {"stream": Field(int, 1, STREAM_MAX)},
}
"""Messages the daemon sends without being asked."""

HELLO: dict[str, Field] = {"version": Field(int, 0, 1 << 16), "secret": TEXT, "pid": Field(int, 0, PID_MAX)}
ERROR: dict[str, Field] = {"code": TEXT, "error": TEXT}


def frame_header(stream: int, length: int) -> bytes:
    """The 9 bytes that start a frame of `length` bytes (0: the end of the stream) on `stream`."""
    return b"\0" + stream.to_bytes(4, "big") + length.to_bytes(4, "big")


def parse_frame_header(header: bytes | bytearray) -> tuple[int, int]:
    """(stream, length) of a frame's first `FRAME_HEADER` bytes; `ProtocolError` past `FRAME_MAX`."""
    length = int.from_bytes(header[5:9], "big")
    if length > FRAME_MAX:
        raise ProtocolError(f"a frame of {length} bytes (the limit is {FRAME_MAX})")
    return int.from_bytes(header[1:5], "big"), length


def check_fields(msg: dict[str, Any], fields: dict[str, Field]) -> dict[str, Any]:
    """`msg` reduced to `fields`, each present and valid; raises `ProtocolError`."""
    out = {}
    for name, field in fields.items():
        value = msg.get(name)
        field.check(name, value)
        out[name] = value
    return out


def check_message(msg: Any) -> str:
    """The `type` of a message the server received, once its envelope is valid (`result` or a push)."""
    if not isinstance(msg, dict):
        raise ProtocolError(f"a message must be a JSON object, not {type(msg).__name__}")
    kind = msg.get("type")
    if kind == "result":
        # id null: the daemon's answer to a line it could not read (the server sends none such).
        check_fields(msg, {"id": Field(int, 0, optional=True), "ok": FLAG})
    elif kind in PUSHES:
        check_fields(msg, PUSHES[kind])
    else:
        raise ProtocolError(f"unknown message type {str(kind)[:40]!r}")
    return str(kind)


def check_result(op: str, msg: dict[str, Any]) -> dict[str, Any]:
    """The values of a successful reply to `op` (an unknown op's reply carries none)."""
    values = check_fields(msg, RESULTS.get(op, {}))
    if op == "list":
        entries = values["processes"]
        if not all(isinstance(entry, dict) for entry in entries):
            raise ProtocolError("field 'processes' must hold objects")
        values["processes"] = [check_fields(entry, PROCESS) for entry in entries]
    elif op == "ports":
        entries = values["ports"]
        if len(entries) > PORTS_MAX or not all(isinstance(entry, dict) for entry in entries):
            raise ProtocolError(f"field 'ports' must hold at most {PORTS_MAX} objects")
        values["ports"] = [_port(entry) for entry in entries]
    elif op == "fs_list":
        values["entries"] = [check_entry(entry) for entry in values["entries"]]
    elif op == "fs_stat":
        values["entry"] = check_entry(values["entry"])
    return values


def _port(entry: dict[str, Any]) -> dict[str, Any]:
    values = check_fields(entry, PORT)
    address = entry.get("address")
    values["address"] = address if isinstance(address, str) and len(address) <= 64 else ""
    return values


def check_entry(entry: Any) -> dict[str, Any]:
    """A file entry a daemon sent: fields of the right types, a sane name and a relative path."""
    if not isinstance(entry, dict):
        raise ProtocolError("a file entry must be an object")
    values = check_fields(entry, ENTRY)
    name, path, kind, size = values["name"], values["path"], values["type"], values["size"]
    if kind not in ENTRY_TYPES or (size is None) != (kind == "directory"):
        raise ProtocolError("a file entry has a bad type or size")
    if values["mtime"] != values["mtime"]:  # NaN
        raise ProtocolError("a file entry has a bad time")
    if not name or len(name) > NAME_MAX or "/" in name or "\x00" in name:
        raise ProtocolError("a file entry has a bad name")
    if path == name == ".":
        return values
    parts = path.split("/")
    if (
        len(path) > PATH_MAX
        or "\x00" in path
        or parts[-1] != name
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ProtocolError("a file entry has a bad path")
    return values


def check_error(msg: dict[str, Any]) -> tuple[str, str]:
    """(code, message) of a failed reply, the message cut to `TEXT_MAX`."""
    values = check_fields(msg, ERROR)
    return values["code"][:64], values["error"][:TEXT_MAX]


def hello(secret: str, pid: int) -> dict[str, Any]:
    """The daemon's first message on a connection."""
    return {"type": "hello", "version": VERSION, "secret": secret, "pid": pid}


def check_hello(msg: Any) -> dict[str, Any]:
    """A hello's fields; `ProtocolError` if it is none or of another version (the message says which)."""
    if not isinstance(msg, dict) or msg.get("type") != "hello":
        raise ProtocolError("the daemon did not start with a hello")
    values = check_fields(msg, HELLO)
    if values["version"] != VERSION:
        raise ProtocolError(f"the daemon speaks protocol version {values['version']}, the server {VERSION}")
    if len(values["secret"]) > SECRET_MAX:
        raise ProtocolError("the hello's secret is too long")
    return values
