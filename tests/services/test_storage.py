"""Storage belongs to the providers (issue 11, item 6): a session's folders and disk image are made
by its provider from the session id, and go when the session goes.

Through a real server with workspace quotas (needs root for the loop mount), on both backends.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crogia.sandbox.base import SandboxSpec
from tests.conftest import BACKENDS, IN_CI, make_settings, need_docker
from tests.support.server import run_server


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_provider_makes_and_removes_a_sessions_storage(backend: str, data_dir: Path) -> None:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("workspace quotas need root, and under CI this must run")
        pytest.skip("workspace quotas need root")
    if backend == "docker":
        need_docker()
    assert not {"workspace", "state_dir"} & set(SandboxSpec.__dataclass_fields__)  # no host paths
    async with run_server(make_settings(data_dir, backend, sandbox_disk_mb=64)) as server:
        provider = server.runtime.provider
        assert provider.storage is not None and provider.storage.disks is server.runtime.sessions.disks
        assert server.runtime.sessions.disks.active, "workspace quotas are unavailable here"
        sid = str((await server.create_session(task="storage"))["session_id"])
        paths = provider.paths(sid)
        assert paths.workspace == server.settings.workspaces_dir / sid
        assert paths.state_dir == server.settings.sandbox_state_dir / sid
        assert os.path.ismount(paths.workspace), "the workspace is not its own disk"
        image = data_dir / "disks" / f"{sid}.ext4"
        assert image.exists()
        assert (await server.client.delete(f"/api/sessions/{sid}")).status_code in (200, 204)
        assert not image.exists() and not paths.workspace.exists() and not paths.state_dir.exists()
