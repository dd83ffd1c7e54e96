"""The pasta processes a test's sandboxes left running, found by the namespace they serve."""

from __future__ import annotations

from pathlib import Path


def pasta_of(scope: str) -> list[int]:
    """Pids of the pasta processes serving a namespace of `scope` (`crogia-<scope>-...`)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"pasta") and any(f"crogia-{scope}-".encode() in a for a in argv):
            found.append(int(proc.name))
    return found
