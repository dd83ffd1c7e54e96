"""A second Docker engine, made and removed by a test: its own socket, data and exec roots (its own
containerd), in a network namespace of its own, with no bridge and no firewall rules of its own, so
the shared engine and this host's network are never touched (`--bridge=none` makes dockerd delete
any `docker0` it sees: in its own namespace there is none)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def engine_cli(sock: str, *args: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "-H", sock, *args], capture_output=True, text=True, timeout=timeout)


def wait_for(check: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def second_engine(*extra: str) -> Iterator[tuple[str, Path]]:
    """Yield the engine's address (`unix://...`) and its root folder; `extra`: more dockerd flags."""
    root = Path(tempfile.mkdtemp(prefix="crogia-engine-"))
    root.chmod(0o755)  # a remapped root must be able to walk to its data root
    sock = f"unix://{root}/docker.sock"
    argv = ["unshare", "--net", "--", "dockerd", *extra]
    argv += ["--data-root", f"{root}/data", "--exec-root", f"{root}/exec"]
    argv += ["-H", sock, "--pidfile", f"{root}/docker.pid", "--bridge=none", "--iptables=false"]
    argv += ["--ip-masq=false", "--ip6tables=false"]
    with open(root / "dockerd.log", "wb") as log:
        engine = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
    try:
        assert wait_for(lambda: engine_cli(sock, "info").returncode == 0, 30), (
            root / "dockerd.log"
        ).read_text()
        yield sock, root
    finally:
        for cid in engine_cli(sock, "ps", "-aq").stdout.split():
            engine_cli(sock, "rm", "-f", cid, timeout=60)
        engine.send_signal(signal.SIGTERM)
        engine.wait(60)
        shutil.rmtree(root, ignore_errors=True)
