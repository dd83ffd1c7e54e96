"""A crowd through the preview proxy: 100 kept-alive clients at once, each answer its own request's."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from tests.previews.helpers import serve_app
from tests.support.server import RunningServer

CLIENTS, EACH = 100, 3


async def _client(host: str, port: int, prefix: str, n: int) -> list[tuple[int, bytes]]:
    """`EACH` GETs of `/crowd/{n}/{i}` over one kept-alive connection: (status, body) for each."""
    reader, writer = await asyncio.open_connection(host, port)
    answers = []
    try:
        for i in range(EACH):
            writer.write(f"GET {prefix}/crowd/{n}/{i} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            status, length = int((await reader.readline()).split()[1]), 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            answers.append((status, await reader.readexactly(length)))
    finally:
        writer.close()
        await writer.wait_closed()
    return answers


async def test_a_hundred_clients_at_once_each_get_their_own_answers(server: RunningServer) -> None:
    """Kept-alive upstream connections are shared between clients: none may get another's answer."""
    sid = str((await server.create_session())["session_id"])
    await serve_app(server, sid, 8000)
    url = urlsplit(server.base_url)
    assert url.hostname is not None and url.port is not None
    prefix = f"/api/sessions/{sid}/ports/8000"
    crowd = [_client(url.hostname, url.port, prefix, n) for n in range(CLIENTS)]
    results = await asyncio.wait_for(asyncio.gather(*crowd), 120)
    for n, answers in enumerate(results):
        for i, (status, body) in enumerate(answers):
            assert status == 200, (n, i, body[:300])
            assert f"path=/crowd/{n}/{i}\n".encode() in body, (n, i, body[:300])
