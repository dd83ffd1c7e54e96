"""Caps on what one client can make the server hold (issue 10, item 7), through a real server process.

Sessions per tenant and per server under a concurrent burst, metadata and env sizes, images outside
SANDBOX_IMAGES, and the memory eight concurrent 100 MB uploads or JSON bodies cost. (An allowed image
the engine lacks: tests/api/test_failures.py, which needs Docker.)
"""

from __future__ import annotations

import asyncio
import select
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.hostile.front_door_support import Server, running_server

TOKENS = {"alice": "tok-alice", "bob": "tok-bob", "carol": "tok-carol"}
ENV = {
    "API_TOKENS": ",".join(f"{name}={token}" for name, token in TOKENS.items()),
    "MAX_SESSIONS": "5",
    "MAX_SESSIONS_PER_TENANT": "3",
}
UPLOAD_BYTES = 100 * 1024 * 1024  # REQUEST_MAX_BYTES


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("caps"), ENV) as running:
        yield running


def _auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[tenant]}"}


def _create(server: Server, tenant: str, **body: object) -> httpx.Response:
    return httpx.post(f"{server.base_url}/api/sessions", json=body, headers=_auth(tenant), timeout=60)


def _details(response: httpx.Response) -> str:
    return str(response.json()["detail"])


def test_metadata_and_env_past_their_caps_are_422(server: Server) -> None:
    too_much_metadata = _create(server, "alice", metadata={"blob": "x" * 17_000})
    assert too_much_metadata.status_code == 422 and "16384 bytes" in _details(too_much_metadata)
    too_many = _create(server, "alice", env={f"V{i}": "1" for i in range(65)})
    assert too_many.status_code == 422 and "at most 64 entries" in _details(too_many)
    too_big = _create(server, "alice", env={f"V{i}": "x" * 5000 for i in range(8)})
    assert too_big.status_code == 422 and "32768 bytes" in _details(too_big)


def test_an_image_outside_sandbox_images_is_403(server: Server) -> None:
    response = _create(server, "alice", image="python:3.12-slim")
    assert response.status_code == 403
    assert "python:3.12-slim" in _details(response) and "SANDBOX_IMAGES" in _details(response)


async def _burst(server: Server, tenant: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=server.base_url, headers=_auth(tenant), timeout=60) as client:
        return list(await asyncio.gather(*(client.post("/api/sessions", json={}) for _ in range(count))))


def _statuses(responses: list[httpx.Response]) -> list[int]:
    return sorted(r.status_code for r in responses)


def test_session_caps_hold_under_a_burst(server: Server) -> None:
    alice = asyncio.run(_burst(server, "alice", 8))
    assert _statuses(alice) == [200] * 3 + [409] * 5, [r.text for r in alice]
    assert all("MAX_SESSIONS_PER_TENANT" in _details(r) for r in alice if r.status_code == 409)
    bob = asyncio.run(_burst(server, "bob", 8))
    assert _statuses(bob) == [200] * 2 + [409] * 6, [r.text for r in bob]
    assert all("MAX_SESSIONS)" in _details(r) for r in bob if r.status_code == 409)
    assert _create(server, "carol").status_code == 409
    first = next(r for r in alice if r.status_code == 200).json()["session_id"]
    deleted = httpx.delete(f"{server.base_url}/api/sessions/{first}", headers=_auth("alice"), timeout=60)
    assert deleted.status_code == 200
    carol = _create(server, "carol")
    assert carol.status_code == 200, carol.text
    listed = httpx.get(f"{server.base_url}/api/sessions", headers=_auth("alice"), timeout=30).json()
    assert len(listed) == 2


def _a_session_of_alice(server: Server) -> str:
    sessions = httpx.get(f"{server.base_url}/api/sessions", headers=_auth("alice"), timeout=30).json()
    found: str = sessions[0]["session_id"] if sessions else _create(server, "alice").json()["session_id"]
    return found


def _upload(server: Server, session_id: str, name: str, results: list[int]) -> None:
    def body() -> Iterator[bytes]:
        chunk = b"\xa5" * (1 << 20)
        for _ in range(UPLOAD_BYTES // len(chunk)):
            yield chunk

    url = f"{server.base_url}/api/sessions/{session_id}/files/raw?path={name}"
    response = httpx.put(url, content=body(), headers=_auth("alice"), timeout=120)
    results.append(response.status_code)


def test_concurrent_large_uploads_go_to_disk_not_memory(server: Server) -> None:
    session_id = _a_session_of_alice(server)
    results: list[int] = []
    before = peak = server.rss_mb()
    uploads = [
        threading.Thread(target=_upload, args=(server, session_id, f"big-{i}.bin", results)) for i in range(8)
    ]
    for upload in uploads:
        upload.start()
    while any(upload.is_alive() for upload in uploads):
        peak = max(peak, server.rss_mb())
        time.sleep(0.05)
    print(f"8 concurrent 100 MB uploads: server RSS {before:.0f} MB before, {peak:.0f} MB at the peak")
    assert results == [200] * 8
    assert peak < 300 and peak - before < 120, (before, peak)


JSON_START = b'{"path": "big.txt", "content": "'


def _post_json(server: Server, session_id: str, size: int, answers: list[bytes]) -> None:
    """POST a JSON body of `size` bytes as a client that reads while it sends: it stops at the answer."""
    head = (
        f"POST /api/sessions/{session_id}/files/content HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {TOKENS['alice']}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size + len(JSON_START) + 2}\r\n\r\n"
    ).encode()
    with server.connect(timeout=60) as sock:
        chunk, sent, answer = b"j" * (1 << 20), 0, b""
        try:
            sock.sendall(head + JSON_START)
            while sent < size and not answer:
                part = chunk[: size - sent]
                sock.sendall(part)
                sent += len(part)
                if select.select([sock], [], [], 0)[0]:
                    answer = sock.recv(4096)
            if not answer:
                sock.sendall(b'"}')
                answer = sock.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            answer = answer or b"reset"  # the server answered and closed with our bytes unread
    answers.append(answer[:12])


def test_large_json_bodies_are_refused_before_they_are_held(server: Server) -> None:
    session_id = _a_session_of_alice(server)
    answers: list[bytes] = []
    before = peak = server.rss_mb()
    size = UPLOAD_BYTES - 1024  # within REQUEST_MAX_BYTES: only JSON_MAX_BYTES refuses it
    posts = [threading.Thread(target=_post_json, args=(server, session_id, size, answers)) for _ in range(8)]
    for post in posts:
        post.start()
    while any(post.is_alive() for post in posts):
        peak = max(peak, server.rss_mb())
        time.sleep(0.05)
    print(f"8 concurrent 100 MB JSON bodies: server RSS {before:.0f} MB before, {peak:.0f} MB at the peak")
    assert set(answers) <= {b"HTTP/1.1 413", b"reset"} and b"HTTP/1.1 413" in answers, answers
    assert peak - before < 120, (before, peak)
    fits: list[bytes] = []
    _post_json(server, session_id, 4 * 1024 * 1024, fits)  # under JSON_MAX_BYTES (8 MiB)
    assert fits == [b"HTTP/1.1 200"]
