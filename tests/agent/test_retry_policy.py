"""Which model failures are retried, and how long the agent waits before trying again."""

from __future__ import annotations

import httpx2
import pytest
from openai import APIConnectionError, APIError, APIStatusError

from crogia.agent.model import RetryPolicy, retry_reason
from crogia.agent.stream import IncompleteStream

REQUEST = httpx2.Request("POST", "http://model.test/v1/chat/completions")


def status_error(status: int, **headers: str) -> APIStatusError:
    response = httpx2.Response(status, headers=headers, request=REQUEST)
    return APIStatusError(f"Error code: {status}", response=response, body=None)


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503])
def test_transient_statuses_are_retried(status: int) -> None:
    assert retry_reason(status_error(status)) == f"HTTP {status} from the model server"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_request_errors_are_not_retried(status: int) -> None:
    assert retry_reason(status_error(status)) is None


def test_the_server_can_say_whether_to_retry() -> None:
    assert retry_reason(status_error(500, **{"x-should-retry": "false"})) is None
    assert retry_reason(status_error(400, **{"x-should-retry": "true"})) is not None


def test_broken_streams_and_mid_stream_errors_are_retried() -> None:
    assert "ended before" in str(retry_reason(IncompleteStream("cut")))
    assert "connection" in str(retry_reason(APIConnectionError(request=REQUEST)))
    mid_stream = APIError("overloaded", REQUEST, body={"message": "overloaded"})
    assert "mid-stream: overloaded" in str(retry_reason(mid_stream))
    assert retry_reason(ValueError("a bug")) is None


def test_backoff_doubles_up_to_the_cap_with_some_jitter() -> None:
    policy = RetryPolicy(backoff_base=1.0, backoff_max=5.0)
    for attempt, full in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 5.0), (10, 5.0)]:
        delay = policy.delay(attempt, status_error(503))
        assert 0.75 * full <= delay <= full


def test_retry_after_headers_win_within_a_limit() -> None:
    policy = RetryPolicy(backoff_base=100.0, backoff_max=100.0, max_retry_after=30.0)
    assert policy.delay(0, status_error(429, **{"retry-after-ms": "250"})) == 0.25
    assert policy.delay(0, status_error(429, **{"retry-after": "2"})) == 2.0
    assert policy.delay(0, status_error(429, **{"retry-after": "3600"})) == 30.0
    # An HTTP date is not parsed: our own backoff applies.
    dated = status_error(429, **{"retry-after": "Wed, 21 Oct 2037 07:28:00 GMT"})
    assert policy.delay(0, dated) >= 75.0
