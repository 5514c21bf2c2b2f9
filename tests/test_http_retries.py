"""The vendor HTTP retry policy of ``request_json``, against a real scripted HTTP server on
127.0.0.1 (the standard library's threading HTTP/1.1 server answering each request with the
next scripted status, headers and body): exact status sequences, exact call counts."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from scripted_http import Scripted, ScriptedHTTPServer, reset_thread_transport

from workers.http import VendorHTTPError, request_json

FAST: dict[str, Any] = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}
JSON = {"Content-Type": "application/json"}


pytestmark = pytest.mark.usefixtures("fresh_transport")


def test_5xx_then_success_is_retried() -> None:
    script = [Scripted(503), Scripted(502), Scripted(200, JSON, b'{"value": 1}')]
    with ScriptedHTTPServer(script) as server:
        assert request_json("GET", server.url("/metrics"), retries=3, **FAST) == {"value": 1}
        assert len(server.requests) == 3
        assert {r.request_line for r in server.requests} == {"GET /metrics HTTP/1.1"}


def test_other_4xx_is_never_retried() -> None:
    script = [Scripted(404, JSON, b'{"error": "not found"}')] * 4
    with ScriptedHTTPServer(script) as server:
        with pytest.raises(VendorHTTPError) as raised:
            request_json("GET", server.url("/metrics"), retries=3, **FAST)
        assert len(server.requests) == 1
    assert raised.value.status == 404
    assert raised.value.body_excerpt == '{"error": "not found"}'
    assert raised.value.permanent


def test_429_waits_at_least_retry_after() -> None:
    script = [Scripted(429, {"Retry-After": "0.3"}), Scripted(200, JSON, b'{"ok": true}')]
    with ScriptedHTTPServer(script) as server:
        started = time.monotonic()
        assert request_json("GET", server.url("/metrics"), retries=1, **FAST) == {"ok": True}
        assert time.monotonic() - started >= 0.3  # backoff alone would be ~0.01 s
        assert len(server.requests) == 2


def test_timeouts_are_retried_then_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FANOUT_HTTP_TIMEOUT_S", "0.2")
    reset_thread_transport()  # the transport caches the timeout it was built with
    # The answers would come after 60 s: a ReadTimeout (not the 200) is the proof that each
    # read gave up at its timeout; the server's stop ends the waiting answers at once.
    script = [Scripted(200, JSON, b"{}", delay_s=60)] * 4
    with ScriptedHTTPServer(script) as server:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            request_json("GET", server.url("/metrics"), retries=2, **FAST)
        elapsed = time.monotonic() - started
        assert len(server.requests) == 3
        assert server.connections == 3  # a timed-out connection is never reused
    assert elapsed >= 3 * 0.2  # three reads, each waited for its whole timeout


def test_exhausted_retries_raise_a_typed_error_with_a_short_excerpt() -> None:
    with ScriptedHTTPServer([Scripted(500, body=b"x" * 5000)] * 3) as server:
        with pytest.raises(VendorHTTPError) as raised:
            request_json("GET", server.url("/metrics"), retries=1, **FAST)
        assert len(server.requests) == 2
    assert raised.value.status == 500
    assert len(raised.value.body_excerpt) == 200
    assert raised.value.body_excerpt == "x" * 200
