"""Schemathesis against the live server's `/openapi.json`: every operation, positive and negative
inputs, boundary values (the coverage phase) and random ones (fuzzing). Zero 5xx, and every answer
is one the document declares (status, content type, body schema).

Path parameters are mostly swapped for real ids (a live session, a finished task, a running and an
exited process), so the deep routes do their work instead of answering 404; a share keep the
generated value, so unknown ids are tried too. `DELETE /api/sessions/{id}` gets spare sessions.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from crogia.app import create_app
from crogia.config import Settings
from tests.conftest import make_settings
from tests.support.server import RunningServer
from tests.trust.threaded import ThreadedServer

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 60
"""Random examples per operation and generation mode (the coverage phase adds its boundary cases)."""
SPARE_SESSIONS = 6
TOKEN = "fuzz-token-0123456789"
CANCEL = "POST /api/sessions/{session_id}/tasks/{task_id}/cancel"
NEED_A_GUESSED_PATH = {
    "GET /api/sessions/{session_id}/files/content",
    "GET /api/sessions/{session_id}/files/raw",
    "DELETE /api/sessions/{session_id}/files",
    "POST /api/sessions/{session_id}/files/move",
}
"""Operations that succeed only on an existing path, which random text rarely names."""
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@dataclass
class Ids:
    """Real things to point the fuzzer's path parameters at."""

    session_id: str
    task_id: str
    """A finished task."""
    running_pid: int
    exited_pid: int
    spare_sessions: list[str]
    """For `DELETE /api/sessions/{session_id}`, one each."""


@dataclass
class Live:
    api: ThreadedServer
    ids: Ids
    calls: Counter[str] = field(default_factory=Counter)
    real: Counter[tuple[str, int]] = field(default_factory=Counter)
    """(operation, status) of answers to requests that carried the real session id."""

    def record(self, case: Case, status: int, real: bool) -> None:
        self.calls[case.operation.label] += 1
        if real:
            self.real[case.operation.label, status] += 1

    def substitute(self, case: Case) -> bool:
        """Put real ids into most cases' path; True when the session id is a real one."""
        params, ids = case.path_parameters, self.ids
        if not params or "session_id" not in params:
            return False
        if _bucket(case) == 0 or (case.meta is not None and case.meta.is_negative_at(ParameterLocation.PATH)):
            return False  # keep the generated ids: unknown ones, or ones of the wrong type
        if case.method.upper() == "DELETE" and case.path == "/api/sessions/{session_id}":
            if not ids.spare_sessions:
                return False
            params["session_id"] = ids.spare_sessions.pop()
            return True
        params["session_id"] = ids.session_id
        if "task_id" in params:
            params["task_id"] = ids.task_id
        if "pid" in params:
            # A running process would keep `logs/follow` open until it ends.
            follow = case.path.endswith("/follow")
            params["pid"] = ids.exited_pid if follow or _bucket(case) == 1 else ids.running_pid
        return True


def _bucket(case: Case) -> int:
    key = json.dumps([case.path_parameters, case.query, case.body], sort_keys=True, default=repr)
    return zlib.crc32(key.encode()) % 4


async def _prepare(server: RunningServer) -> Ids:
    client = server.client
    sid = str((await server.create_session(task="fuzz"))["session_id"])
    spares = [str((await server.create_session(task="spare"))["session_id"]) for _ in range(SPARE_SESSIONS)]
    await client.post(f"/api/sessions/{sid}/files/content", json={"path": "src/app.py", "content": "print()"})
    running = (await client.post(f"/api/sessions/{sid}/processes", json={"cmd": "sleep 600"})).json()["pid"]
    exited = (await client.post(f"/api/sessions/{sid}/processes", json={"cmd": "echo done"})).json()["pid"]
    task_id = (await client.post(f"/api/sessions/{sid}/tasks", json={"task": "hello"})).json()["task_id"]
    for _ in range(200):
        task = (await client.get(f"/api/sessions/{sid}/tasks/{task_id}")).json()
        process = (await client.get(f"/api/sessions/{sid}/processes")).json()[1]
        if task["status"] == "completed" and process["status"] == "exited":
            return Ids(sid, task_id, running, exited, spares)
        await asyncio.sleep(0.05)
    raise AssertionError(f"set-up did not settle: {task}, {process}")


async def _delete_all(server: RunningServer) -> None:
    for session in (await server.client.get("/api/sessions")).json():
        await server.client.delete(f"/api/sessions/{session['session_id']}")


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    data_dir = Path(tempfile.mkdtemp(prefix="cg-", dir="/tmp"))

    def settings_for(model_url: str) -> Settings:
        return make_settings(
            data_dir,
            "bubblewrap",
            openai_base_url=model_url,
            model_retries=0,
            shell_timeout=5,
            shell_max_timeout=5,
            process_stop_grace=0.5,
            api_tokens=f"fuzz={TOKEN}",
            # The front door answers a head over MAX_HEADER_BYTES with 431 before any route does
            # (`tests/hostile/test_front_door.py`); this suite checks the routes against their
            # schema, so a generated URL may be as long as schemathesis makes it.
            max_header_bytes=1_048_576,
        )

    try:
        with ThreadedServer(settings_for, token=TOKEN) as api:
            try:
                yield Live(api, api.call(_prepare))
            finally:
                api.call(_delete_all)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _collected_schema() -> schemathesis.BaseSchema:
    """The document as the app builds it, for collection; a test checks the live one is the same."""
    document = create_app(make_settings(Path(tempfile.gettempdir()), "bubblewrap")).openapi()
    config = schemathesis.Config.from_dict(
        {
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES},
            "auth": {"openapi": {"HTTPBearer": {"bearer": TOKEN}}},
            "request-timeout": 30,
        }
    )
    return schemathesis.openapi.from_dict(document, config=config)


schema = _collected_schema()


def test_live_document_is_the_one_fuzzed(live: Live) -> None:
    served = requests.get(f"{live.api.base_url}/openapi.json", timeout=30)
    assert served.status_code == 200
    assert served.json() == schema.raw_schema


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
@schema.parametrize()
def test_api_conforms_to_its_schema(case: Case, live: Live) -> None:
    real = live.substitute(case)
    response = case.call(base_url=live.api.base_url, timeout=30)
    live.record(case, response.status_code, real)
    # A preview answers for the app in the sandbox: a 502 "nothing listens on that port" is its answer.
    preview = "/ports/{port}/" in case.path
    case.validate_response(response, checks=[c for c in CHECKS if not (preview and c is not_a_server_error)])


def test_every_operation_reached_its_handler(live: Live) -> None:
    """The fuzzing above went deep: with the real ids every operation got past the session lookup."""
    if not live.calls:
        pytest.skip("tallies the run of test_api_conforms_to_its_schema; run the module")
    paths = schema.raw_schema["paths"]
    operations = {f"{method.upper()} {path}" for path, ops in paths.items() for method in ops}
    assert set(live.calls) == operations
    statuses = {op: {status for (label, status) in live.real if label == op} for op in operations}
    deep = {op for op in operations if "{session_id}" in op}
    refused = {401, 404, 405, 422}  # the session lookup, auth or validation said no
    shallow = {op: answers for op, answers in statuses.items() if op in deep and not answers - refused}
    assert not shallow, f"never past the session lookup: {shallow}"
    succeeded = {op for op in deep if any(200 <= status < 300 for status in statuses[op])}
    previews = {op for op in deep if "/ports/{port}/" in op}  # need a server in the sandbox (tests/previews)
    assert deep - succeeded <= NEED_A_GUESSED_PATH | {CANCEL} | previews, deep - succeeded
    assert 409 in statuses[CANCEL]  # the real task has finished: cancelling it is a conflict
    print(f"schemathesis: {len(operations)} operations, {sum(live.calls.values())} requests")
