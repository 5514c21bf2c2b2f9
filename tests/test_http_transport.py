"""``KeepAliveTransport`` against real servers on 127.0.0.1: the standard library's HTTP/1.1
server for ordinary exchanges, and a raw socket server (exact bytes, exact closes) for framing,
keep-alive and failure cases. Every test counts the connections and requests the server saw."""

from __future__ import annotations

import gzip
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scripted_http import (
    RawServer,
    Reply,
    Scripted,
    ScriptedHTTPServer,
    response,
)

from workers import http_transport
from workers.http import request_json
from workers.http_transport import KeepAliveTransport

TIMEOUTS = httpx.Timeout(2.0).as_dict()
JSON_TYPE = ("Content-Type", "application/json")
FAST: dict[str, Any] = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}


pytestmark = pytest.mark.usefixtures("fresh_transport")


@pytest.fixture
def transport() -> Iterator[KeepAliveTransport]:
    keep_alive = KeepAliveTransport()
    yield keep_alive
    keep_alive.close()


def ok(n: int, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A keep-alive 200 answer with the JSON body {"n": n}."""
    return response(body=json.dumps({"n": n}).encode(), headers=(JSON_TYPE, *headers))


def send(
    transport: KeepAliveTransport, method: str, url: str, **kwargs: Any
) -> httpx.Response:
    """One request straight through the transport, body read, as ``request_json`` does."""
    return transport.fetch(httpx.Request(method, url, **kwargs), TIMEOUTS)


# --- requests ------------------------------------------------------------------------------


def test_keep_alive_five_gets_share_one_connection() -> None:
    script = [Scripted(200, {"Content-Type": "application/json"}, b'{"n": %d}' % n)
              for n in range(5)]
    with ScriptedHTTPServer(script) as server:
        results = [request_json("GET", server.url(f"/item/{n}"), retries=0) for n in range(5)]
        assert results == [{"n": n} for n in range(5)]
        assert server.connections == 1
        assert [r.request_line for r in server.requests] == [
            f"GET /item/{n} HTTP/1.1" for n in range(5)
        ]
        assert {r.connection for r in server.requests} == {1}


def test_query_string_and_headers_are_sent_exactly() -> None:
    with RawServer([[Reply(ok(1))]]) as server:
        params = {"a": "1 2", "b": ["x", "y"], "c": "é/&="}
        assert request_json("GET", server.url("/metrics"), params=params, retries=0) == {"n": 1}
        [request] = server.requests
    assert request.request_line == "GET /metrics?a=1+2&b=x&b=y&c=%C3%A9%2F%26%3D HTTP/1.1"
    assert request.headers == [
        ("Host", f"127.0.0.1:{server.port}"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate"),  # as httpx.Client asks
        ("user-agent", "fanout"),
    ]
    assert request.body == b""


@pytest.mark.parametrize("size", [10, 100_000], ids=["small", "over-64KiB"])
def test_post_json_body_arrives_exactly(size: int) -> None:
    payload = {"text": "é" * size, "values": [1, 2.5, None]}
    expected = httpx.Request("POST", "http://x/", json=payload).content
    with RawServer([[Reply(ok(7))]]) as server:
        assert request_json("POST", server.url("/submit"), json=payload, retries=0) == {"n": 7}
        [request] = server.requests
    assert request.request_line == "POST /submit HTTP/1.1"
    assert request.body == expected
    assert json.loads(request.body) == payload
    assert request.header("Content-Length") == str(len(expected))
    assert request.header("Content-Type") == "application/json"
    assert request.header("Transfer-Encoding") is None


# --- response framing ----------------------------------------------------------------------


def test_chunked_body_with_extensions_and_trailers_is_decoded() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"5;x=y\r\n{\"n\":\r\n"
        b"a\r\n [1, 2, 3]\r\n"
        b"1;name=\"quoted\";z\r\n}\r\n"
        b"0;last=1\r\nX-Checksum: abc\r\nX-Other: 2\r\n\r\n"
    )
    with RawServer([[Reply(chunked), Reply(ok(2))]]) as server:
        assert request_json("GET", server.url("/a"), retries=0) == {"n": [1, 2, 3]}
        # the trailers were consumed: the next answer on the same connection is in step
        assert request_json("GET", server.url("/b"), retries=0) == {"n": 2}
        assert server.connections == 1
        assert server.requests_per_connection() == [2]


@pytest.mark.parametrize(
    "headers", [(JSON_TYPE, ("Connection", "close")), (JSON_TYPE,)], ids=["close", "no-header"]
)
def test_body_framed_by_close_is_read_whole_and_next_call_redials(
    headers: tuple[tuple[str, str], ...],
) -> None:
    body = json.dumps({"n": 1, "pad": "p" * 100_000}).encode()
    framed_by_close = response(body=body, headers=headers, length=False)
    with RawServer([[Reply(framed_by_close, close=True)], [Reply(ok(2))]]) as server:
        first = request_json("GET", server.url("/a"), retries=0)
        assert first == {"n": 1, "pad": "p" * 100_000}
        assert request_json("GET", server.url("/b"), retries=0) == {"n": 2}
        assert server.connections == 2
        assert server.requests_per_connection() == [1, 1]


def test_connection_close_with_content_length_is_not_reused() -> None:
    # The server leaves the connection open: only the client's reading of the header stops it
    # from sending the next request there.
    closing = ok(1, (("connection", "Close"),))
    with RawServer([[Reply(closing)], [Reply(ok(2))]]) as server:
        assert request_json("GET", server.url("/a"), retries=0) == {"n": 1}
        server.wait_closed(1)
        assert server.eofs == 1  # the client closed the first connection itself
        assert request_json("GET", server.url("/b"), retries=0) == {"n": 2}
        assert server.connections == 2
        assert server.requests_per_connection() == [1, 1]


@pytest.mark.parametrize(
    ("headers", "per_connection"),
    [((JSON_TYPE,), [1, 1]), ((JSON_TYPE, ("Connection", "keep-alive")), [2])],
    ids=["http10-default-close", "http10-keep-alive"],
)
def test_http10_answers_keep_alive_only_when_asked(
    headers: tuple[tuple[str, str], ...], per_connection: list[int]
) -> None:
    first = response(body=b'{"n": 1}', headers=headers, version="HTTP/1.0")
    with RawServer([[Reply(first), Reply(ok(2))], [Reply(ok(2))]]) as server:
        assert request_json("GET", server.url("/a"), retries=0) == {"n": 1}
        assert request_json("GET", server.url("/b"), retries=0) == {"n": 2}
        assert server.requests_per_connection() == per_connection


def test_status_line_without_reason_phrase(transport: KeepAliveTransport) -> None:
    with RawServer([[Reply(b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\n{}")]]) as server:
        answer = send(transport, "GET", server.url())
    assert (answer.status_code, answer.content) == (200, b"{}")
    assert answer.extensions["reason_phrase"] == b""
    assert answer.extensions["http_version"] == b"HTTP/1.1"


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
def test_bodiless_statuses_do_not_hang(transport: KeepAliveTransport, status: bytes) -> None:
    # a 304 may carry the Content-Length of the resource it stands for: no body follows
    bodiless = b"HTTP/1.1 " + status + b"\r\nContent-Length: 50\r\nETag: \"e\"\r\n\r\n"
    with RawServer([[Reply(bodiless), Reply(ok(2))]]) as server:
        # Waiting for the 50 bytes that never come would end in send's 2 s ReadTimeout.
        answer = send(transport, "GET", server.url("/a"))
        assert answer.status_code == int(status[:3])
        assert answer.content == b""
        assert send(transport, "GET", server.url("/b")).json() == {"n": 2}
        assert server.requests_per_connection() == [2]


def test_head_answer_has_no_body_and_does_not_hang(transport: KeepAliveTransport) -> None:
    head = response(headers=(JSON_TYPE, ("Content-Length", "5000")), length=False)
    with RawServer([[Reply(head), Reply(ok(2))]]) as server:
        # Waiting for the 5,000 bytes that never come would end in send's 2 s ReadTimeout.
        answer = send(transport, "HEAD", server.url("/a"))
        assert answer.status_code == 200
        assert answer.headers["content-length"] == "5000"
        assert answer.content == b""
        assert send(transport, "GET", server.url("/b")).json() == {"n": 2}
        assert [r.request_line for r in server.requests] == ["HEAD /a HTTP/1.1", "GET /b HTTP/1.1"]
        assert server.requests_per_connection() == [2]


def test_gzip_body_is_decoded_by_httpx(transport: KeepAliveTransport) -> None:
    payload = {"n": 1, "text": "compressible " * 200}
    compressed = gzip.compress(json.dumps(payload).encode())
    gzipped = response(body=compressed, headers=(JSON_TYPE, ("Content-Encoding", "gzip")))
    with RawServer([[Reply(gzipped)], [Reply(gzipped)]]) as server:
        answer = send(transport, "GET", server.url("/a"))
        assert answer.json() == payload
        assert answer.headers["content-length"] == str(len(compressed))
        assert request_json("GET", server.url("/b"), retries=0) == payload  # its own transport
        assert server.connections == 2


# --- keep-alive and failures ---------------------------------------------------------------


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "reset"])
def test_stale_keep_alive_connection_is_redialled_transparently(reset: bool) -> None:
    script = [[Reply(ok(1), close=True, reset=reset)], [Reply(ok(2))]]
    with RawServer(script) as server:
        assert request_json("GET", server.url("/a"), retries=0) == {"n": 1}
        server.wait_closed(1)  # the server dropped the idle connection
        assert request_json("GET", server.url("/b"), retries=0) == {"n": 2}
        assert server.connections == 2
        assert [(r.connection, r.request_line) for r in server.requests] == [
            (1, "GET /a HTTP/1.1"),
            (2, "GET /b HTTP/1.1"),
        ]


def test_stale_connection_is_redialled_only_once() -> None:
    script = [[Reply(ok(1), close=True)], [Reply(None, close=True)], [Reply(ok(3))]]
    with RawServer(script) as server:
        assert request_json("GET", server.url("/a"), retries=0) == {"n": 1}
        server.wait_closed(1)
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            request_json("GET", server.url("/b"), retries=0)
        assert server.connections == 2
        assert server.requests_per_connection() == [1, 1]


@pytest.mark.parametrize("retries", [0, 2])
def test_fresh_connection_closed_without_answer_raises(retries: int) -> None:
    with RawServer([[Reply(None, close=True)]] * 4) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            request_json("GET", server.url("/a"), retries=retries, **FAST)
        assert server.connections == retries + 1
        assert server.requests_per_connection() == [1] * (retries + 1)


def test_connect_refused_raises_connect_error(transport: KeepAliveTransport) -> None:
    with socket.socket() as bound:  # bound, never listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}/a"
        with pytest.raises(httpx.ConnectError):
            request_json("GET", url, retries=1, **FAST)
        with pytest.raises(httpx.ConnectError):
            send(transport, "GET", url)


def test_body_shorter_than_content_length_raises() -> None:
    short = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
    with RawServer([[Reply(short, close=True)]]) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="ended after 3 of 10 bytes"):
            request_json("GET", server.url("/a"), retries=0)
        assert server.connections == 1


@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/1.1 abc OK", b"garbage", b"HTTP/2 200 OK", b"HTTP/1.1 99 Low", b"ICY 200 OK"],
)
def test_malformed_status_line_raises(status_line: bytes) -> None:
    malformed = status_line + b"\r\nContent-Length: 2\r\n\r\n{}"
    with RawServer([[Reply(malformed, close=True)]]) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="malformed status line"):
            request_json("GET", server.url("/a"), retries=0)
        assert server.connections == 1


def test_read_timeout_raises_read_timeout(transport: KeepAliveTransport) -> None:
    with RawServer([[Reply(None)], [Reply(ok(2))]]) as server:  # reads, never answers
        request = httpx.Request("GET", server.url("/a"))
        request.extensions["timeout"] = httpx.Timeout(0.2).as_dict()
        started = time.monotonic()
        # The request's 0.2 s is the only timeout there is (the transport has none of its
        # own): without it this read would block, so the ReadTimeout proves it was applied.
        with pytest.raises(httpx.ReadTimeout):
            transport.handle_request(request)
        assert time.monotonic() - started >= 0.2
        assert send(transport, "GET", server.url("/b")).json() == {"n": 2}
        assert server.connections == 2  # the timed-out connection was dropped


def test_mounted_in_an_httpx_client() -> None:
    with RawServer([[Reply(ok(1)), Reply(ok(2))]]) as server:
        with httpx.Client(transport=KeepAliveTransport(), timeout=2.0) as client:
            first = client.get(server.url("/a"), params={"q": "1"})
            second = client.post(server.url("/b"), json={"k": "v"})
            assert (first.status_code, first.json()) == (200, {"n": 1})
            assert (second.status_code, second.json()) == (200, {"n": 2})
        server.wait_closed(1)  # closing the client closed its transport's connection
        assert server.eofs == 1
        assert server.connections == 1
        get, post = server.requests
    assert get.request_line == "GET /a?q=1 HTTP/1.1"
    assert get.header("user-agent") == f"python-httpx/{httpx.__version__}"
    assert get.header("accept-encoding") is not None
    assert post.request_line == "POST /b HTTP/1.1"
    assert post.body == b'{"k":"v"}'


# --- interim answers and streamed bodies -------------------------------------------------


def test_informational_answer_before_the_final_one_is_skipped() -> None:
    early_hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    with RawServer([[Reply(early_hints + ok(1)), Reply(ok(2))]]) as server:
        assert request_json("GET", server.url("/a"), retries=0) == {"n": 1}
        assert request_json("GET", server.url("/b"), retries=0) == {"n": 2}
        assert server.requests_per_connection() == [2]


def test_streamed_request_body_is_framed() -> None:
    with RawServer([[Reply(ok(1))]], timeout_s=0.3) as server:
        content = iter([b"hello", b"world"])
        assert request_json("POST", server.url("/a"), content=content, retries=0) == {"n": 1}
        [request] = server.requests
    assert request.body == b"helloworld"


# --- idle connections and TLS ------------------------------------------------------------------


def test_a_connection_idle_past_the_expiry_is_not_reused() -> None:
    now = [100.0]
    transport = KeepAliveTransport(keepalive_expiry_s=5.0, clock=lambda: now[0])
    script = [Scripted(200, {"Content-Type": "application/json"}, b'{"n": %d}' % n)
              for n in range(3)]
    with ScriptedHTTPServer(script) as server:
        assert send(transport, "GET", server.url("/a")).json() == {"n": 0}
        now[0] += 5.0  # idle exactly the expiry: still reused
        assert send(transport, "GET", server.url("/b")).json() == {"n": 1}
        now[0] += 5.01  # idle past it: closed, and a new connection dialled
        assert send(transport, "GET", server.url("/c")).json() == {"n": 2}
        assert [r.connection for r in server.requests] == [1, 1, 2]
    transport.close()


@pytest.fixture
def vendor_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[trustme.CA]:
    """A certificate authority the TLS context trusts (through SSL_CERT_FILE, as httpx reads
    it), built afresh for the test and forgotten after."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    http_transport._tls_context.cache_clear()
    yield ca
    http_transport._tls_context.cache_clear()


def test_https_calls_verify_the_vendor_and_share_one_connection(vendor_ca: trustme.CA) -> None:
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    vendor_ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    script = [Scripted(200, {"Content-Type": "application/json"}, b'{"n": %d}' % n)
              for n in range(3)]
    with ScriptedHTTPServer(script, tls=server_tls) as server:
        assert server.url().startswith("https://127.0.0.1:")
        got = [request_json("GET", server.url(f"/m/{n}"), retries=0) for n in range(3)]
        assert got == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert server.connections == 1
        assert [r.request_line for r in server.requests] == [
            f"GET /m/{n} HTTP/1.1" for n in range(3)]


def test_https_to_a_vendor_whose_certificate_is_not_trusted_fails_to_connect(
    vendor_ca: trustme.CA,
) -> None:
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(server_tls)  # another CA's
    with ScriptedHTTPServer([Scripted(200, body=b"{}")], tls=server_tls) as server:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            request_json("GET", server.url("/m"), retries=0)
        assert server.requests == []


def test_an_https_connection_the_vendor_dropped_while_idle_is_redialled(
    vendor_ca: trustme.CA,
) -> None:
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    vendor_ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    script = [Scripted(200, {"Content-Type": "application/json"}, b'{"n": 0}', close_after=True),
              Scripted(200, {"Content-Type": "application/json"}, b'{"n": 1}')]
    with ScriptedHTTPServer(script, tls=server_tls) as server:
        assert request_json("GET", server.url("/a"), retries=0) == {"n": 0}
        # The vendor closed the kept connection after answering (no header, no close_notify).
        assert request_json("GET", server.url("/b"), retries=0) == {"n": 1}
        assert [r.connection for r in server.requests] == [1, 2]


# --- a plain GET built without httpx's URL parsing -----------------------------------------

_HEADERS = {"accept": "application/json", "user-agent": "fanout"}
_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
_PLAIN = st.text(alphabet="abcXYZ019._~-", max_size=6)


@given(
    scheme=st.sampled_from(["http", "https", "HTTP"]),
    host=st.sampled_from(["127.0.0.1", "vendor.example", "Vendor.Example", "v-1.io", "[::1]"]),
    port=st.sampled_from(["", ":80", ":443", ":8765", ":08765", ":70000"]),
    path=st.lists(st.one_of(_PLAIN, _TEXT), max_size=3).map(lambda p: "/".join(["", *p])),
    params=st.none() | st.dictionaries(st.one_of(_PLAIN, _TEXT), st.one_of(_PLAIN, _TEXT),
                                       max_size=3),
)
@settings(max_examples=400, deadline=None)
def test_a_plain_get_is_httpx_own_request_byte_for_byte(
    scheme: str, host: str, port: str, path: str, params: dict[str, str] | None,
) -> None:
    url = f"{scheme}://{host}{port}{path}"
    try:
        request = httpx.Request("GET", url, params=params, headers=_HEADERS)
    except (httpx.InvalidURL, ValueError):
        assume(False)
    plain = http_transport.plain_get(url, params, _HEADERS)
    if plain is None:  # left to httpx: nothing to compare
        return
    httpx_own = http_transport.Call.of(request)
    assert (plain.method, plain.origin, plain.data) == \
        (httpx_own.method, httpx_own.origin, httpx_own.data)
    assert plain.made is None
    assert plain.request.url == request.url  # made when asked, the same request


def test_plain_gets_are_the_demo_vendor_calls() -> None:
    """What the demo pipeline asks is plain: the fast path is the common one."""
    for url, params in [("http://127.0.0.1:8765/accounts", None),
                        ("http://127.0.0.1:8765/accounts/acct-001/services/svc-002/metrics",
                         {"day": "2026-01-31"}),
                        ("https://api.example.com/repos/pydantic/pydantic", {})]:
        assert http_transport.plain_get(url, params, _HEADERS) is not None


@pytest.mark.parametrize("path", ["/.", "/..", "/a/./b", "/a/../b", "/a/."])
def test_a_path_with_dot_segments_is_left_to_httpx(path: str) -> None:
    """httpx removes dot segments (``/a/./b`` goes out as ``/a/b``): the fast path must not
    send them as they stand (hypothesis found ``/.`` sent as ``GET /.``)."""
    assert http_transport.plain_get(f"http://127.0.0.1:8765{path}", None, _HEADERS) is None
