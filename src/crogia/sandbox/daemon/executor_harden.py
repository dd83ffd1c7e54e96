"""Part of the executor daemon: keep the commands it runs from tracing or rewriting it.

The commands run as the daemon's own uid (root in the sandbox), so by default they could
`ptrace` it or write its memory through `/proc/<pid>/mem`, and with it forge every reply the
server gets. A non-dumpable process can be traced only with CAP_SYS_PTRACE, which no sandbox
has. Its children are dumpable again: `execve` resets the flag, so debuggers work on them.
"""

from __future__ import annotations

PR_SET_DUMPABLE = 4


def make_undumpable() -> bool:
    """prctl(PR_SET_DUMPABLE, 0); False where it cannot be done (no ctypes, not Linux)."""
    try:
        import ctypes  # the daemon imports it anyway, to trim its heap once idle

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0  # type: ignore[no-any-return]
    except (ImportError, AttributeError, OSError):
        return False
