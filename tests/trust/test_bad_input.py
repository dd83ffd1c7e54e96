"""Bad input the fuzzer found answered with a 5xx or a broken body, now a clear 4xx or error frame."""

from __future__ import annotations

import pytest

from tests.support.server import RunningServer


@pytest.mark.parametrize(
    "env",
    [{"": "x"}, {"A=B": "x"}, {"1ST": "x"}, {"OK": "nul\u0000inside"}],
    ids=["empty-name", "equals-in-name", "leading-digit", "nul-in-value"],
)
async def test_environment_that_setenv_refuses_is_a_422(server: RunningServer, env: dict[str, str]) -> None:
    before = (await server.client.get("/api/sessions")).json()
    created = await server.client.post("/api/sessions", json={"env": env})
    assert created.status_code == 422, created.text
    assert "env" in created.text
    # Nothing half-made is left behind.
    assert (await server.client.get("/api/sessions")).json() == before


async def test_process_environment_is_checked_too(server: RunningServer) -> None:
    sid = (await server.create_session())["session_id"]
    try:
        started = await server.client.post(
            f"/api/sessions/{sid}/processes", json={"cmd": "sleep 1", "env": {"A B": "x"}}
        )
        assert started.status_code == 422, started.text
        assert (await server.client.get(f"/api/sessions/{sid}/processes")).json() == []
    finally:
        await server.client.delete(f"/api/sessions/{sid}")


async def test_streamed_command_that_cannot_start_ends_with_an_error_frame(server: RunningServer) -> None:
    sid = (await server.create_session())["session_id"]
    try:
        body = {"cmd": "echo hi", "cwd": "/no/such/folder"}
        async with server.client.stream("POST", f"/api/sessions/{sid}/shell/stream", json=body) as response:
            text = (await response.aread()).decode()  # a broken chunked body would raise here
        assert response.status_code == 200
        assert text.startswith("event: error\ndata: {")
        assert "/no/such/folder" in text and "does not exist" in text
        # The plain route says the same with a status.
        plain = await server.client.post(f"/api/sessions/{sid}/shell", json=body)
        assert plain.status_code == 400 and "does not exist" in plain.json()["detail"]
        # And the session still works.
        ok = await server.client.post(f"/api/sessions/{sid}/shell", json={"cmd": "echo fine"})
        assert ok.json()["output"].strip() == "fine"
    finally:
        await server.client.delete(f"/api/sessions/{sid}")


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("shell", {"cmd": "echo hi", "tty": 0}),
        ("search/files", {"pattern": "*", "include_hidden": "yes"}),
        ("search/grep", {"pattern": "x", "max_results": "5"}),
        ("files/content", {"path": 7, "content": "x"}),
    ],
)
async def test_values_of_the_wrong_type_are_refused_not_guessed(
    server: RunningServer, route: str, body: dict[str, object]
) -> None:
    sid = (await server.create_session())["session_id"]
    try:
        answer = await server.client.post(f"/api/sessions/{sid}/{route}", json=body)
        assert answer.status_code == 422, answer.text
        assert isinstance(answer.json()["detail"], list)
    finally:
        await server.client.delete(f"/api/sessions/{sid}")
