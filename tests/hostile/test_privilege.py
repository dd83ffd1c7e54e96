"""Hostile: what root inside a sandbox can do to the host (issue 10, items 3 and 8's setsid).

Each attack runs as a command through `POST /shell` of a real server, on both backends; the
setuid and device-node ones are then tried by a real unprivileged host user (`nobody`).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from crogia.sandbox.bubblewrap import DEFAULT_UID_RANGE
from crogia.sandbox.userns import UidRange
from tests.conftest import BACKENDS, IN_CI, make_settings, need_docker
from tests.support.server import RunningServer, run_server

# One syscall by number from Python (x86-64 numbers), printing its errno: 0 means it worked.
_SYSCALL = (
    "import ctypes,sys; l=ctypes.CDLL(None,use_errno=True);"
    " a=[ctypes.c_long(int(x,0)) for x in sys.argv[2:]];"
    " r=l.syscall(int(sys.argv[1]),*a); print('errno', ctypes.get_errno() if r<0 else 0)"
)
IO_URING_SETUP, KEYCTL, BPF, PTRACE, UNSHARE = 425, 250, 321, 101, 272
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


def need_root() -> None:
    """These tests act as root and as a host user: skip elsewhere, fail under CI (they must run)."""
    if os.geteuid() != 0:
        reason = "the privilege tests need root (they also act as the host user nobody)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(params=BACKENDS)
async def server(request: pytest.FixtureRequest, data_dir: Path) -> AsyncIterator[RunningServer]:
    need_root()
    if request.param == "docker":
        need_docker()
    os.chmod(data_dir, 0o755)  # as a data folder usually is: any host user may walk to it
    async with run_server(make_settings(data_dir, request.param)) as running:
        yield running


@pytest.fixture
async def sid(server: RunningServer) -> str:
    return str((await server.create_session(task="privilege"))["session_id"])


async def shell(server: RunningServer, sid: str, cmd: str) -> dict:  # type: ignore[type-arg]
    response = await server.client.post(f"/api/sessions/{sid}/shell", json={"cmd": cmd, "timeout": 30})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def syscall_errno(server: RunningServer, sid: str, *args: int) -> int:
    out = await shell(server, sid, f'python3 -c "{_SYSCALL}" {" ".join(map(str, args))}')
    assert out["exit_code"] == 0 and out["output"].startswith("errno "), out
    return int(out["output"].split()[1])


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run `argv` as the unprivileged host user `nobody`, without any group.

    Through a shell: setpriv's own exec of the target still resolves its path as root.
    """
    shell = ["/bin/sh", "-c", 'exec "$0" "$@"']
    return subprocess.run([*NOBODY, *shell, *argv], capture_output=True, text=True, timeout=30, check=False)


async def test_a_setuid_shell_from_the_sandbox_gives_a_host_user_nothing(
    server: RunningServer, sid: str
) -> None:
    out = await shell(
        server, sid, "cp /bin/bash /workspace/rootsh && chmod 4755 /workspace/rootsh && chmod 777 ."
    )
    assert out["exit_code"] == 0, out
    rootsh = server.settings.workspaces_dir / sid / "rootsh"
    ran = await asyncio.to_thread(as_nobody, str(rootsh), "-p", "-c", "id -u")
    assert ran.stdout.strip() != "0", "a host user became root through a sandbox's setuid file"
    assert ran.returncode != 0 and "Permission denied" in ran.stderr, ran
    for folder in (server.settings.workspaces_dir, server.settings.sandbox_state_dir):
        assert os.stat(folder).st_mode & 0o007 == 0, f"{folder} is open to other host users"


async def test_a_device_node_from_the_sandbox_opens_nothing_on_the_host(
    server: RunningServer, sid: str
) -> None:
    await shell(server, sid, "mknod -m 666 /workspace/blk b 7 0; chmod 777 /workspace")
    node = server.settings.workspaces_dir / sid / "blk"
    opened = await asyncio.to_thread(as_nobody, "dd", f"if={node}", "of=/dev/null", "count=1")
    assert opened.returncode != 0, "a host user opened a block device a sandbox made"


async def test_commands_cannot_trace_or_rewrite_the_daemon(server: RunningServer, sid: str) -> None:
    daemon = (await shell(server, sid, "pgrep -f '^/usr/bin/python3 -S -c'"))["output"].strip()
    assert daemon.isdigit(), daemon
    assert await syscall_errno(server, sid, PTRACE, 16, int(daemon), 0, 0) != 0  # PTRACE_ATTACH
    out = await shell(server, sid, f"head -c 16 /proc/{daemon}/mem >/dev/null; echo rc=$?")
    assert "rc=0" not in out["output"], "a command read the daemon's memory"
    get_dumpable = "import ctypes; print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"  # PR_GET_DUMPABLE
    child = await shell(server, sid, f'python3 -c "{get_dumpable}"')
    assert child["output"].strip() == "1", child  # the daemon's children stay normal, traceable processes


async def test_io_uring_keyrings_and_bpf_are_refused(server: RunningServer, sid: str) -> None:
    assert await syscall_errno(server, sid, IO_URING_SETUP, 1, 0) == 1  # EPERM, not EFAULT
    assert await syscall_errno(server, sid, KEYCTL, 0, 0) == 1
    assert await syscall_errno(server, sid, BPF, 0, 0, 0) == 1


async def test_no_new_user_namespace_nor_mount(server: RunningServer, sid: str) -> None:
    assert await syscall_errno(server, sid, UNSHARE, 0x10000000) != 0  # CLONE_NEWUSER
    out = await shell(
        server, sid, "unshare -Ur true; echo rc=$?; mkdir -p /tmp/m; mount -t tmpfs x /tmp/m; echo rc=$?"
    )
    assert out["output"].count("rc=0") == 0, out


async def test_health_reports_user_namespace_and_seccomp(server: RunningServer) -> None:
    health = (await server.client.get("/api/health")).json()
    if server.settings.sandbox_backend == "bubblewrap":
        assert health["userns"] == "per-session-uid" and health["seccomp"] == "crogia"
    else:
        assert health["userns"] in ("off", "userns-remap", "rootless")
        assert health["seccomp"] in ("default", "crogia")


async def test_setsid_leftovers_die_with_their_command(server: RunningServer, sid: str) -> None:
    cmd = "setsid sleep 1001 & (setsid sh -c 'sleep 1002 &'); sleep 0.2; pgrep -c -f 'sleep 100[12]'"
    assert (await shell(server, sid, cmd))["output"].strip() == "2"
    left = await shell(server, sid, "pgrep -f 'sleep 100[12]' || echo none")
    assert left["output"].strip() == "none", "setsid processes outlived their command"
    proc = await server.client.post(
        f"/api/sessions/{sid}/processes", json={"cmd": "setsid sleep 1003 & wait"}
    )
    assert proc.status_code == 200, proc.text
    pid = proc.json()["pid"]
    assert (await shell(server, sid, "sleep 0.2; pgrep -c -x sleep"))["output"].strip() == "1"
    assert (await server.client.post(f"/api/sessions/{sid}/processes/{pid}/stop")).status_code == 200
    assert (await shell(server, sid, "pgrep -x sleep || echo none"))["output"].strip() == "none"


@pytest.mark.parametrize("server", [BACKENDS[0]], indirect=True)
async def test_bubblewrap_root_is_the_sessions_own_unprivileged_uid(server: RunningServer) -> None:
    one = str((await server.create_session(task="one"))["session_id"])
    two = str((await server.create_session(task="two"))["session_id"])
    owners = []
    for sid in (one, two):
        await shell(server, sid, "echo x > made.txt")
        wrote = await server.client.post(
            f"/api/sessions/{sid}/files/content", json={"path": "d/api.txt", "content": "a"}
        )
        assert wrote.status_code == 200
        assert (await shell(server, sid, "echo more >> d/api.txt && echo ok"))["output"] == "ok\n"
        ws = server.settings.workspaces_dir / sid
        uids = {os.lstat(ws / name).st_uid for name in ("made.txt", "d", "d/api.txt", ".")}
        assert len(uids) == 1 and uids.pop() in UidRange.parse(DEFAULT_UID_RANGE)
        owners.append(os.lstat(ws).st_uid)
    assert owners[0] != owners[1], "two live sessions share a host uid"
    sandbox = (await server.runtime.sessions.live(one, tenant=None)).sandbox
    await sandbox.stop()  # a restart of the sandbox keeps the uid
    await sandbox.start()
    await shell(server, one, "touch again")
    assert os.lstat(server.settings.workspaces_dir / one / "again").st_uid == owners[0]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_quota_workspace_is_mounted_nosuid(backend: str, data_dir: Path) -> None:
    """Past the 0700 folders (an fd handed over, as a leaked one would be), setuid still does nothing."""
    need_root()
    if backend == "docker":
        need_docker()
    async with run_server(make_settings(data_dir, backend, sandbox_disk_mb=64)) as server:
        assert server.runtime.sessions.disks.active, "workspace quotas are unavailable here"
        sid = str((await server.create_session(task="quota"))["session_id"])
        out = await shell(server, sid, "cp /bin/bash rootsh && chmod 4755 rootsh && ls -l rootsh")
        assert out["output"].startswith("-rwsr-xr-x"), out
        rootsh = server.settings.workspaces_dir / sid / "rootsh"
        fd = os.open(rootsh, os.O_RDONLY)
        try:
            ran = await asyncio.to_thread(
                subprocess.run,
                [*NOBODY, "/bin/sh", "-c", f'exec /proc/self/fd/{fd} -p -c "id -u"'],
                pass_fds=[fd],
                capture_output=True,
                text=True,
                timeout=30,
            )
        finally:
            os.close(fd)
        assert ran.stdout.strip() == str(65534), ran  # nosuid: the set-user-id bit is ignored
