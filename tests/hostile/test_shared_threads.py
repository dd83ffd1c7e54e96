"""What a sandbox decides the size of must not hold the threads every session shares.

The event loop's default executor (`asyncio.to_thread`: sandbox starts, cgroups, namespaces) has
min(32, cores + 4) threads, six here. A sandbox decides how many files its workspace holds, and
removing a workspace walks every one: a million took ~36 s here. Six such deletes at once used to
leave no default thread for anyone's sandbox start for as long.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import make_settings
from tests.hostile.support import new_session
from tests.support.server import run_server


def fill(workspace: Path, folders: int = 120, each: int = 250) -> None:
    """What a sandbox can leave in its workspace: many files (made here from the host, where it is
    quicker; the server's removal walks them all the same), as hard links of one."""
    (workspace / "one").touch()
    for d in range(folders):
        (workspace / f"m{d}").mkdir()
        for i in range(each):
            os.link(workspace / "one", workspace / f"m{d}" / str(i))


async def test_removing_a_workspace_of_many_files_holds_no_shared_thread(
    backend: str, data_dir: Path
) -> None:
    async with run_server(make_settings(data_dir, backend)) as server:
        sid = await new_session(server.client)
        workspace = server.runtime.sessions.provider.paths(sid).workspace
        await asyncio.to_thread(fill, workspace)
        loop = asyncio.get_running_loop()
        shared = ThreadPoolExecutor(1)  # the default executor as if its other threads were busy
        loop.set_default_executor(shared)
        try:
            deleting = asyncio.create_task(server.client.delete(f"/api/sessions/{sid}"))
            deadline = time.monotonic() + 60
            while workspace.exists() and len(os.listdir(workspace)) >= 120:  # not yet removing
                assert time.monotonic() < deadline, "the removal never began"
                await asyncio.sleep(0.005)  # polling a condition (the folder's files) with a deadline
            began = time.monotonic()
            await asyncio.to_thread(lambda: None)  # anyone's sandbox start needs one such thread
            took = time.monotonic() - began
            removing = not deleting.done()
            response = await deleting
        finally:
            loop.set_default_executor(ThreadPoolExecutor())  # (the loop shuts this one down)
            shared.shutdown(wait=False)
        assert response.status_code == 200, response.text
        assert removing, "the workspace was gone before the test looked: it shows nothing"
        assert took < 0.3, f"a shared thread was free only after {took:.2f} s, when the removal ended"
        assert not workspace.exists()
