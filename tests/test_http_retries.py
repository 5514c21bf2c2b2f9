"""Unit tests of the vendor HTTP retry policy (respx stands in for the vendor here only:
the edge cases are exact status sequences that a real server makes awkward to script)."""

from __future__ import annotations

import time

import httpx
import pytest
import respx

from workers.http import VendorHTTPError, request_json

URL = "http://vendor.test/metrics"
FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}


@respx.mock
def test_5xx_then_success_is_retried() -> None:
    route = respx.get(URL).mock(side_effect=[httpx.Response(503), httpx.Response(502),
                                             httpx.Response(200, json={"value": 1})])
    assert request_json("GET", URL, retries=3, **FAST) == {"value": 1}
    assert route.call_count == 3


@respx.mock
def test_other_4xx_is_never_retried() -> None:
    route = respx.get(URL).mock(return_value=httpx.Response(404, json={"error": "not found"}))
    with pytest.raises(VendorHTTPError) as raised:
        request_json("GET", URL, retries=3, **FAST)
    assert route.call_count == 1
    assert raised.value.status == 404
    assert "not found" in raised.value.body_excerpt


@respx.mock
def test_429_waits_at_least_retry_after() -> None:
    route = respx.get(URL).mock(side_effect=[
        httpx.Response(429, headers={"Retry-After": "0.3"}),
        httpx.Response(200, json={"ok": True}),
    ])
    started = time.monotonic()
    assert request_json("GET", URL, retries=1, **FAST) == {"ok": True}
    assert time.monotonic() - started >= 0.3  # backoff alone would be ~0.01 s
    assert route.call_count == 2


@respx.mock
def test_timeouts_are_retried_then_raised() -> None:
    route = respx.get(URL).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(httpx.ReadTimeout):
        request_json("GET", URL, retries=2, **FAST)
    assert route.call_count == 3


@respx.mock
def test_exhausted_retries_raise_a_typed_error_with_a_short_excerpt() -> None:
    respx.get(URL).mock(return_value=httpx.Response(500, text="x" * 5000))
    with pytest.raises(VendorHTTPError) as raised:
        request_json("GET", URL, retries=1, **FAST)
    assert raised.value.status == 500
    assert len(raised.value.body_excerpt) == 200
