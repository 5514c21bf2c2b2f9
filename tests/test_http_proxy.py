"""A proxy named in the environment is honoured by ``request_json`` as httpx honours it: the
lean keep-alive transport has no proxy support, so behind a proxy calls go through an
``httpx.Client``. The proxy here is a real scripted HTTP server on 127.0.0.1, which answers
itself and records the request line the client sent it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from scripted_http import Scripted, ScriptedHTTPServer

from workers import http
from workers.http import request_json

JSON = {"Content-Type": "application/json"}
FAST: dict[str, Any] = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def no_proxy_variables(monkeypatch: pytest.MonkeyPatch, fresh_transport: None) -> None:
    """Whatever this machine's environment says, each test names its own proxies."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def test_calls_go_through_the_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    script = [Scripted(503), Scripted(200, JSON, b'{"via": "proxy"}')]
    with ScriptedHTTPServer(script) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url())
        # The vendor's host does not resolve: only the proxy can have answered.
        got = request_json("GET", "http://vendor.invalid:8080/metrics?day=1", retries=2, **FAST)
        assert got == {"via": "proxy"}
        # Absolute-form request lines are what a client sends to a proxy; the retry went
        # through it too.
        assert [r.request_line for r in proxy.requests] == [
            "GET http://vendor.invalid:8080/metrics?day=1 HTTP/1.1"] * 2
        assert proxy.requests[0].header("user-agent") == "fanout"


def test_no_proxy_sends_a_host_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    with ScriptedHTTPServer([]) as proxy, \
            ScriptedHTTPServer([Scripted(200, JSON, b'{"via": "direct"}')]) as vendor:
        monkeypatch.setenv("HTTP_PROXY", proxy.url())
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert request_json("GET", vendor.url("/metrics"), retries=0) == {"via": "direct"}
        assert [r.request_line for r in vendor.requests] == ["GET /metrics HTTP/1.1"]
        assert proxy.requests == []


def test_the_proxied_path_keeps_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FANOUT_HTTP_TIMEOUT_S", "0.2")
    with ScriptedHTTPServer([Scripted(200, JSON, b"{}", delay_s=1.5)] * 2) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url())
        # The proxy answers after 1.5 s: only a 0.2 s read timeout turns that into an error.
        with pytest.raises(httpx.ReadTimeout):
            request_json("GET", "http://vendor.invalid/metrics", retries=1, **FAST)
        assert len(proxy.requests) == 2


def test_without_a_proxy_calls_take_the_lean_transport() -> None:
    with ScriptedHTTPServer([Scripted(200, JSON, b"[1]")]) as vendor:
        assert request_json("GET", vendor.url("/m"), retries=0) == [1]
        assert vendor.requests[0].request_line == "GET /m HTTP/1.1"
    assert http.environment_proxies() == {}
    assert http._local.entry.proxied is None
