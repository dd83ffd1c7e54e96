"""Fixtures: a real workspace folder under tmp_path, with a canary folder beside it.

`ws` is the `Files` under test, once per SANDBOX_FILES mode: `host` (`HostFiles` on the folder) and
`daemon` (`DaemonFiles` talking to the real executor daemon, run on the host with
`--workspace` = the folder), so every test here proves both answer alike.

`outside` holds files that must never be read, written, listed or searched; tests
compare its snapshot before and after hostile operations.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from crogia.sandbox.files import Files
from crogia.workspace import Ripgrep, Workspace
from tests.support.local_daemon import LocalDaemon, daemon_files, local_daemon

SECRET = "TOP-SECRET-canary-7f3a"


@dataclass(frozen=True)
class Outside:
    """A folder next to the workspace, holding a secret file whose content and mtime must not change."""

    folder: Path
    secret: Path

    def snapshot(self) -> dict[str, tuple[bytes, int]]:
        """Every file under the folder with its content and mtime (ns)."""
        found: dict[str, tuple[bytes, int]] = {}
        for path in sorted(self.folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                found[str(path.relative_to(self.folder))] = (path.read_bytes(), path.stat().st_mtime_ns)
        return found


@pytest.fixture(scope="session")
def ripgrep() -> Ripgrep:
    """One located (and Landlock-probed) rg for the whole run."""
    return Ripgrep()


@pytest.fixture(scope="session")
def unconfined_ripgrep() -> Ripgrep:
    """rg without Landlock, as on kernels that lack it: results are re-checked instead."""
    return Ripgrep(confine=False)


@pytest.fixture
def outside(tmp_path: Path) -> Outside:
    folder = tmp_path / "outside"
    (folder / "sub").mkdir(parents=True)
    secret = folder / "secret.txt"
    secret.write_text(f"{SECRET}\n")
    (folder / "sub" / "deep.py").write_text(f"print('{SECRET}')\n")
    old = 1_600_000_000
    for path in (secret, folder / "sub" / "deep.py"):
        os.utime(path, (old, old))
    return Outside(folder, secret)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "ws"
    folder.mkdir()
    return folder


FilesFactory = Callable[..., Files]


@pytest.fixture(params=["host", "daemon"])
def files_mode(request: pytest.FixtureRequest) -> str:
    mode: str = request.param
    return mode


@pytest.fixture
async def daemon(files_mode: str, root: Path) -> AsyncIterator[LocalDaemon | None]:
    if files_mode != "daemon":
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="cg-logs-") as logs:  # not beside the workspace: tests list that
        async with local_daemon(root, Path(logs)) as running:
            yield running


@pytest.fixture
def make_files(root: Path, ripgrep: Ripgrep, daemon: LocalDaemon | None) -> FilesFactory:
    """`make_files(max_read_bytes=..., max_list_entries=...)`: a `Files` of the mode under test."""

    def make(**limits: Any) -> Files:
        if daemon is None:
            return Workspace(root, ripgrep=ripgrep, **limits)
        return daemon_files(daemon, **limits)

    return make


@pytest.fixture
def ws(make_files: FilesFactory) -> Files:
    return make_files()


def write(root: Path, rel: str, content: str | bytes = "x\n") -> Path:
    """Create a file (and its folders) directly on disk, bypassing the code under test."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    return path
