"""``request_json_async`` and its transport (``AsyncKeepAliveTransport``) against real servers
on 127.0.0.1: the same wire rules as the threads' transport (``test_http_transport.py``), the
same retries as ``request_json`` (``test_http_retries.py``), and what is new with many calls
on one event loop: a pool of connections per host that waits when it is full, a call
cancelled mid-answer that never leaves its connection for the next, and HTTP tries counted
per item (each asyncio task its own)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx
import pytest
from scripted_http import RawServer, Reply, Scripted, ScriptedHTTPServer, response

from workers import http
from workers.http import VendorHTTPError, request_json_async
from workers.http_async_transport import AsyncKeepAliveTransport, origin_of

T = TypeVar("T")
TIMEOUTS = httpx.Timeout(2.0).as_dict()
JSON_TYPE = ("Content-Type", "application/json")
JSON = {"Content-Type": "application/json"}
FAST: dict[str, Any] = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}

pytestmark = pytest.mark.usefixtures("fresh_transport")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """On a new event loop each time: each loop has its own pooled transport."""
    return asyncio.run(coroutine)


def ok(n: int) -> bytes:
    return response(body=json.dumps({"n": n}).encode(), headers=(JSON_TYPE,))


def get(url: str, **kwargs: Any) -> Coroutine[Any, Any, Any]:
    return request_json_async("GET", url, retries=kwargs.pop("retries", 0), **kwargs)


# --- the wire ------------------------------------------------------------------------------


def test_sequential_calls_share_one_keep_alive_connection() -> None:
    script = [Scripted(200, JSON, b'{"n": %d}' % n) for n in range(5)]
    with ScriptedHTTPServer(script) as server:
        async def five() -> list[Any]:
            return [await get(server.url(f"/item/{n}")) for n in range(5)]

        assert run(five()) == [{"n": n} for n in range(5)]
        assert server.connections == 1
        assert [r.request_line for r in server.requests] == [
            f"GET /item/{n} HTTP/1.1" for n in range(5)]


def test_request_line_and_headers_are_those_of_the_threads_transport() -> None:
    params = {"a": "1 2", "b": ["x", "y"], "c": "é/&="}
    with RawServer([[Reply(ok(1))], [Reply(ok(1))]]) as server:
        assert run(get(server.url("/metrics"), params=params)) == {"n": 1}
        assert http.request_json("GET", server.url("/metrics"), params=params,
                                 retries=0) == {"n": 1}
        on_loop, on_thread = server.requests
    assert on_loop.request_line == on_thread.request_line == \
        "GET /metrics?a=1+2&b=x&b=y&c=%C3%A9%2F%26%3D HTTP/1.1"
    assert on_loop.headers == on_thread.headers


def test_post_json_body_arrives_exactly() -> None:
    payload = {"k": "v" * 100_000}
    with RawServer([[Reply(ok(1))]]) as server:
        assert run(request_json_async("POST", server.url("/r"), json=payload,
                                      retries=0)) == {"n": 1}
        [request] = server.requests
    assert json.loads(request.body) == payload
    assert request.header("Content-Length") == str(len(request.body))


def test_chunked_body_with_trailers_is_decoded_and_the_connection_stays_in_step() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"5;x=y\r\n{\"n\":\r\n"
        b"a\r\n [1, 2, 3]\r\n"
        b"1\r\n}\r\n"
        b"0\r\nX-Checksum: abc\r\n\r\n"
    )
    with RawServer([[Reply(chunked), Reply(ok(2))]]) as server:
        async def two() -> list[Any]:
            return [await get(server.url("/a")), await get(server.url("/b"))]

        assert run(two()) == [{"n": [1, 2, 3]}, {"n": 2}]
        assert server.requests_per_connection() == [2]


def test_body_framed_by_close_is_read_whole_and_the_next_call_redials() -> None:
    body = json.dumps({"n": 1, "pad": "p" * 100_000}).encode()
    with RawServer([[Reply(response(body=body, headers=(JSON_TYPE,), length=False),
                           close=True)], [Reply(ok(2))]]) as server:
        async def two() -> list[Any]:
            return [await get(server.url("/a")), await get(server.url("/b"))]

        first, second = run(two())
        assert first == {"n": 1, "pad": "p" * 100_000} and second == {"n": 2}
        assert server.requests_per_connection() == [1, 1]


def test_stale_keep_alive_connection_is_redialled_once() -> None:
    script = [[Reply(ok(1), close=True)], [Reply(ok(2))]]
    with RawServer(script) as server:
        async def two() -> list[Any]:
            first = await get(server.url("/a"))
            await asyncio.to_thread(server.wait_closed, 1)  # dropped while idle
            return [first, await get(server.url("/b"))]

        assert run(two()) == [{"n": 1}, {"n": 2}]
        assert server.requests_per_connection() == [1, 1]


def test_fresh_connection_closed_without_an_answer_raises() -> None:
    with RawServer([[Reply(None, close=True)]] * 3) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            run(get(server.url("/a"), retries=2, **FAST))
        assert server.requests_per_connection() == [1, 1, 1]


def test_body_shorter_than_content_length_raises() -> None:
    short = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
    with RawServer([[Reply(short, close=True)]]) as server, \
            pytest.raises(httpx.RemoteProtocolError, match="ended after 3 of 10 bytes"):
        run(get(server.url("/a")))


def test_malformed_status_line_raises() -> None:
    garbage = b"garbage\r\nContent-Length: 2\r\n\r\n{}"
    with RawServer([[Reply(garbage, close=True)]]) as server, \
            pytest.raises(httpx.RemoteProtocolError, match="malformed status line"):
        run(get(server.url("/a")))


def test_connect_refused_raises_connect_error() -> None:
    with socket.socket() as bound:  # bound, never listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        with pytest.raises(httpx.ConnectError):
            run(get(f"http://127.0.0.1:{bound.getsockname()[1]}/a", retries=1, **FAST))


def test_read_timeout_drops_the_connection() -> None:
    with RawServer([[Reply(None)], [Reply(ok(2))]]) as server:  # reads, never answers
        transport = AsyncKeepAliveTransport(max_connections=4)

        async def timed_out_then_ok() -> tuple[float, Any]:
            request = httpx.Request("GET", server.url("/a"))
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                await transport.fetch(request, httpx.Timeout(0.2).as_dict())
            waited = time.monotonic() - started
            answer = await transport.fetch(httpx.Request("GET", server.url("/b")), TIMEOUTS)
            return waited, answer.json()

        waited, answer = run(timed_out_then_ok())
        assert waited >= 0.2 and answer == {"n": 2}
        assert server.connections == 2  # the timed-out connection was not reused


# --- many calls on one loop ----------------------------------------------------------------


def test_a_full_pool_waits_for_a_connection_and_never_opens_more() -> None:
    """Ten calls at once through a pool of three: three connections, each carrying its
    calls one after another, and every call answered."""
    script = [Scripted(200, JSON, b'{"n": 1}', delay_s=0.2)] * 10
    with ScriptedHTTPServer(script) as server:
        transport = AsyncKeepAliveTransport(max_connections=3)
        most_open = 0

        async def one() -> Any:
            nonlocal most_open
            answer = await transport.fetch(httpx.Request("GET", server.url("/a")), TIMEOUTS)
            most_open = max(most_open, transport.open_connections(origin_of(server.url())))
            return answer.json()

        async def ten() -> list[Any]:
            return await asyncio.gather(*(one() for _ in range(10)))

        assert run(ten()) == [{"n": 1}] * 10
        assert server.connections == 3
        assert most_open == 3
        assert len(server.requests) == 10


def test_a_call_cancelled_mid_answer_never_leaves_its_connection_to_the_next() -> None:
    """Its answer would arrive on the connection later: the next call must not read it."""
    late = Reply(response(body=b'{"n": "late"}', headers=(JSON_TYPE,)))
    with RawServer([[Reply(None), late], [Reply(ok(2))]]) as server:
        transport = AsyncKeepAliveTransport(max_connections=1)

        async def cancel_then_call() -> Any:
            first = asyncio.create_task(
                transport.fetch(httpx.Request("GET", server.url("/a")), TIMEOUTS))
            await asyncio.sleep(0.2)  # sent, waiting for its answer
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            second = await transport.fetch(httpx.Request("GET", server.url("/b")), TIMEOUTS)
            return second.json()

        assert run(cancel_then_call()) == {"n": 2}
        assert server.connections == 2


def test_each_task_counts_its_own_http_tries() -> None:
    """Items of a batch run as tasks on one loop: a failed item reports its own tries."""
    script = [Scripted(503), Scripted(503), Scripted(200, JSON, b'{"n": 1}')]
    with ScriptedHTTPServer(script) as flaky, \
            ScriptedHTTPServer([Scripted(200, JSON, b'{"n": 2}')]) as steady:
        async def item(url: str, retries: int) -> int:
            http.reset_tries()
            await request_json_async("GET", url, retries=retries, **FAST)
            return http.tries()

        async def both() -> list[int]:
            return await asyncio.gather(item(flaky.url("/f"), 3), item(steady.url("/s"), 3))

        assert run(both()) == [3, 1]


# --- retries (the policy of request_json) --------------------------------------------------


def test_5xx_then_success_is_retried() -> None:
    script = [Scripted(503), Scripted(502), Scripted(200, JSON, b'{"value": 1}')]
    with ScriptedHTTPServer(script) as server:
        assert run(get(server.url("/m"), retries=3, **FAST)) == {"value": 1}
        assert len(server.requests) == 3


def test_other_4xx_is_never_retried() -> None:
    with ScriptedHTTPServer([Scripted(404, JSON, b'{"error": "not found"}')] * 4) as server:
        with pytest.raises(VendorHTTPError) as raised:
            run(get(server.url("/m"), retries=3, **FAST))
        assert len(server.requests) == 1
    assert raised.value.status == 404 and raised.value.permanent


def test_429_waits_at_least_retry_after_without_blocking_the_loop() -> None:
    script = [Scripted(429, {"Retry-After": "0.3"}), Scripted(200, JSON, b'{"ok": true}')]
    with ScriptedHTTPServer(script) as server:
        ticks = 0

        async def ticking() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async def call_while_ticking() -> tuple[Any, float]:
            ticker = asyncio.create_task(ticking())
            started = time.monotonic()
            answer = await get(server.url("/m"), retries=1, **FAST)
            ticker.cancel()
            return answer, time.monotonic() - started

        answer, waited = run(call_while_ticking())
        assert answer == {"ok": True} and waited >= 0.3
        assert ticks >= 10  # the loop went on while the call waited out Retry-After
        assert len(server.requests) == 2
