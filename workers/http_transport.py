"""A lean HTTP/1.1 keep-alive transport for httpx, one per worker thread.

Stages still speak httpx: ``request_json`` builds an ``httpx.Request`` (URL, params and body
encoding are httpx's) and gets an ``httpx.Response`` back, and failures are httpx's exception
types, so retry rules and user code see nothing new. Only the wire work is done here. A worker
thread makes one call at a time, so the connection pool, locks and h11 state machine of httpx's
default transport are work a JSON call does not need: measured on one thread against the
demo vendor, httpx's transport costs about 200 µs of CPU per GET, this one about 75 µs.

What it speaks: HTTP/1.1 requests with a body of known length; responses framed by
Content-Length, chunked transfer coding, or the connection closing; keep-alive with one
connection per origin, not reused after 5 s idle; TLS with httpx's own SSL context (same
certificates and verification, ``SSL_CERT_FILE`` included).
A reused connection the server closed while idle is redialled once, but only when not a byte of
the answer came back (as other clients do: a server that read the request and then closed
without a word sees it once more). Interim 1xx answers are skipped; a streamed request body is
collected and sent with its Content-Length. No HTTP/2, proxies or
Unix sockets: a stage that needs them passes its own ``httpx.Client`` to ``request_json``,
which also takes one itself when the environment names a proxy (``workers/http.py``).
"""

from __future__ import annotations

import functools
import re
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import httpx

#: A connection idle this long is closed, not reused (httpx's default too): servers and NATs
#: drop idle connections, often silently, and a request sent into one waits for its timeout.
KEEPALIVE_EXPIRY_S = 5.0
_MAX_LINE = 65536
_MAX_HEADERS = 200
_NO_BODY_STATUSES = frozenset({204, 304})


class _StaleConnection(Exception):
    """A reused connection gave no answer at all: the server had closed it while idle."""


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()


Origin = tuple[bytes, bytes, int]


class Call:
    """A request ready for the wire: its method, origin and bytes. The ``httpx.Request`` it
    stands for is made only when something asks for it (an error raised, a response mounted
    in a client): for a plain GET, httpx's URL parsing was a fifth of a call's CPU."""

    __slots__ = ("_made", "_make", "data", "method", "origin")

    def __init__(self, method: str, origin: Origin, data: bytes,
                 make: Callable[[], httpx.Request]) -> None:
        self.method = method
        self.origin = origin
        self.data = data  # the request line, the headers and the body
        self._make = make
        self._made: httpx.Request | None = None

    @classmethod
    def of(cls, request: httpx.Request) -> Call:
        """The call of an ``httpx.Request`` (its body read)."""
        url = request.url
        origin = (url.raw_scheme, url.raw_host, url.port or (443 if url.scheme == "https" else 80))
        body = request.read()
        call = cls(request.method, origin, _request_head(request, len(body)) + body,
                   lambda: request)
        call._made = request
        return call

    @property
    def request(self) -> httpx.Request:
        if self._made is None:
            self._made = self._make()
        return self._made

    @property
    def made(self) -> httpx.Request | None:
        """The request, if it was made (a response carries it then)."""
        return self._made


# A URL and query whose request line needs no quoting: a lowercase ASCII host, a path and
# values of unreserved characters. Anything else is built by httpx.
_PLAIN_URL = re.compile(r"(https?)://([a-z0-9](?:[a-z0-9.-]*[a-z0-9])?)(?::([0-9]{1,5}))?"
                        r"(/[A-Za-z0-9._~/-]*)?")
_PLAIN_WORD = re.compile(r"[A-Za-z0-9._~-]*")


def plain_get(
    url: str, params: Mapping[str, Any] | None, headers: Mapping[str, str]
) -> Call | None:
    """The call ``httpx.Request("GET", url, params=params, headers=headers)`` would make,
    byte for byte, when ``url`` and ``params`` (text keys and values) need no quoting;
    None otherwise (the caller makes the ``httpx.Request``)."""
    match = _PLAIN_URL.fullmatch(url)
    if match is None:
        return None
    scheme, host, port_text, path = match.groups()
    if path and any(segment in (".", "..") for segment in path.split("/")):
        return None  # httpx removes dot segments ("/a/./b" is "/a/b")
    default_port = 443 if scheme == "https" else 80
    port = int(port_text) if port_text else default_port
    if port_text and (port == default_port or not 0 < port < 65536 or port_text[0] == "0"):
        return None  # httpx writes these its own way
    target = path or "/"
    if params:
        pairs = []
        for key, value in params.items():
            if not (isinstance(key, str) and isinstance(value, str) and key
                    and _PLAIN_WORD.fullmatch(key) and _PLAIN_WORD.fullmatch(value)):
                return None
            pairs.append(f"{key}={value}")
        target += "?" + "&".join(pairs)
    authority = f"{host}:{port}" if port_text else host
    lines = [f"GET {target} HTTP/1.1", f"Host: {authority}",
             *(f"{name}: {value}" for name, value in headers.items()), "", ""]
    try:
        data = "\r\n".join(lines).encode("ascii")
    except UnicodeEncodeError:
        return None
    return Call("GET", (scheme.encode(), host.encode(), port), data,
                lambda: httpx.Request("GET", url, params=params, headers=headers))


class _Connection:
    """One keep-alive socket to one origin, with a buffered reader over it."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.reader: BinaryIO = sock.makefile("rb")
        self.used = False  # has answered a request already (so it may have gone stale)
        self.idle_since = 0.0

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class KeepAliveTransport(httpx.BaseTransport):
    """An ``httpx`` transport for one thread: one keep-alive connection per origin."""

    def __init__(
        self, keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connections: dict[tuple[bytes, bytes, int], _Connection] = {}
        self.keepalive_expiry_s = keepalive_expiry_s
        self._clock = clock

    def prepare(self, url: str) -> None:
        """Build now what the first call to ``url`` would build (the TLS context)."""
        if url.startswith("https:"):
            _tls_context()

    def fetch(self, request: httpx.Request, timeouts: dict[str, float | None]) -> httpx.Response:
        """``request`` with these timeouts (httpx.Timeout(...).as_dict()), its body read."""
        return self.send(Call.of(request), timeouts)

    def send(self, call: Call, timeouts: dict[str, float | None]) -> httpx.Response:
        """``call`` with these timeouts, its answer's body read."""
        response = self._send(call, timeouts)
        try:
            response.read()
        finally:
            response.close()
        return response

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._send(Call.of(request), request.extensions.get("timeout", {}))

    def _send(self, call: Call, timeouts: dict[str, float | None]) -> httpx.Response:
        origin = call.origin
        connection = self._connections.pop(origin, None)
        if connection is not None and (
            self._clock() - connection.idle_since > self.keepalive_expiry_s
        ):
            connection.close()  # idle too long to trust
            connection = None
        if connection is not None:
            try:
                return self._exchange(connection, call, timeouts)
            except _StaleConnection:
                pass  # the server dropped it while idle: dial afresh, once
        connection = _dial(origin, timeouts)
        try:
            return self._exchange(connection, call, timeouts)
        except _StaleConnection as exc:
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response.", request=call.request
            ) from exc

    def _exchange(
        self, connection: _Connection, call: Call, timeouts: dict[str, float | None],
    ) -> httpx.Response:
        reused = connection.used
        try:
            connection.sock.settimeout(timeouts.get("write"))
            try:
                connection.sock.sendall(call.data)
            except TimeoutError as exc:
                raise httpx.WriteTimeout(str(exc) or "write timed out",
                                         request=call.request) from exc
            except OSError as exc:
                if reused:
                    raise _StaleConnection from exc
                raise httpx.WriteError(str(exc), request=call.request) from exc
            connection.sock.settimeout(timeouts.get("read"))
            try:
                response, keep_alive = _read_response(connection.reader, call, reused)
            except TimeoutError as exc:
                raise httpx.ReadTimeout(str(exc) or "read timed out",
                                        request=call.request) from exc
            except OSError as exc:  # reset, TLS errors
                raise httpx.ReadError(str(exc), request=call.request) from exc
        except BaseException:
            connection.close()
            raise
        if keep_alive:
            connection.used = True
            connection.idle_since = self._clock()
            old = self._connections.pop(call.origin, None)
            if old is not None:
                old.close()
            self._connections[call.origin] = connection
        else:
            connection.close()
        return response

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()


def _request_head(request: httpx.Request, body_length: int) -> bytes:
    """The request line and headers (httpx has set Host, and Content-Length for a body of
    known length; a streamed body, sent whole here, gets one instead of chunked framing)."""
    lines = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    streamed = False
    for name, value in request.headers.raw:
        if name.lower() == b"transfer-encoding":
            streamed = True
            continue
        lines += (name, b": ", value, b"\r\n")
    if streamed:
        lines.append(b"Content-Length: %d\r\n" % body_length)
    lines.append(b"\r\n")
    return b"".join(lines)


def _dial(origin: tuple[bytes, bytes, int], timeouts: dict[str, float | None]) -> _Connection:
    scheme, host, port = origin
    hostname = host.decode("ascii")
    try:
        sock = socket.create_connection((hostname, port), timeout=timeouts.get("connect"))
    except TimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "connect timed out") from exc
    except OSError as exc:
        raise httpx.ConnectError(str(exc)) from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if scheme == b"https":
            sock = _tls_context().wrap_socket(sock, server_hostname=hostname)
    except TimeoutError as exc:
        sock.close()
        raise httpx.ConnectTimeout(str(exc) or "TLS handshake timed out") from exc
    except OSError as exc:  # ssl.SSLError is an OSError
        sock.close()
        raise httpx.ConnectError(str(exc)) from exc
    return _Connection(sock)


def _read_response(
    reader: BinaryIO, call: Call, reused: bool
) -> tuple[httpx.Response, bool]:
    """Read one answer; also say whether the connection may carry the next request."""
    while True:
        version, status, reason, headers, framing = _read_head(reader, call, reused)
        reused = False  # a byte of the answer came: the connection was not stale
        if not 100 <= status < 200 or status == 101:
            break  # interim answers (100 Continue, 103 Early Hints) come before the real one
    length, chunked, connection_header = framing
    keep_alive = (
        b"close" not in connection_header
        if version == b"HTTP/1.1"
        else b"keep-alive" in connection_header
    )
    if call.method == "HEAD" or status in _NO_BODY_STATUSES or status == 101:
        content = b""
        keep_alive = keep_alive and status != 101  # switched protocols: not HTTP any more
    elif chunked:
        content = _read_chunked(reader, call)
    elif length is not None:
        content = reader.read(length)
        if len(content) < length:
            raise httpx.RemoteProtocolError(
                f"response body ended after {len(content)} of {length} bytes",
                request=call.request,
            )
    else:
        content = reader.read()  # framed by the server closing the connection
        keep_alive = False
    response = httpx.Response(
        status,
        headers=headers,
        stream=httpx.ByteStream(content),
        request=call.made,
        extensions={"http_version": version, "reason_phrase": reason},
    )
    return response, keep_alive


def _read_head(
    reader: BinaryIO, call: Call, reused: bool
) -> tuple[bytes, int, bytes, list[tuple[bytes, bytes]], tuple[int | None, bool, bytes]]:
    """One status line and its headers, with what frames the body: Content-Length, chunked,
    and the Connection header."""
    try:
        status_line = reader.readline(_MAX_LINE + 1)
    except (ConnectionError, ssl.SSLEOFError):  # a TLS peer that closed without close_notify
        if reused:
            raise _StaleConnection from None
        raise
    if not status_line:
        if reused:
            raise _StaleConnection
        raise httpx.RemoteProtocolError(
            "Server disconnected without sending a response.", request=call.request
        )
    version, status, reason = _parse_status(status_line, call)
    head = ResponseHead(call)
    while not head.add_line(reader.readline(_MAX_LINE + 1)):
        pass
    return version, status, reason, head.headers, head.framing()


class ResponseHead:
    """The header lines of one answer, read one at a time by a transport (the async one
    too, ``workers/http_async.py``): the headers, and what frames the body."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.headers: list[tuple[bytes, bytes]] = []
        self.length: int | None = None
        self.chunked = False
        self.connection = b""

    def add_line(self, line: bytes) -> bool:
        """Take one line; True at the blank line that ends the headers."""
        if line in (b"\r\n", b"\n"):
            return True
        if not line or len(line) > _MAX_LINE or len(self.headers) >= _MAX_HEADERS:
            raise httpx.RemoteProtocolError("malformed response headers",
                                            request=self.call.request)
        name, sep, value = line.partition(b":")
        if not sep:
            raise httpx.RemoteProtocolError(f"malformed header line {line[:80]!r}",
                                            request=self.call.request)
        name, value = name.strip(), value.strip()
        self.headers.append((name, value))
        lowered = name.lower()
        if lowered == b"content-length":
            self.length = _parse_length(value, self.call)
        elif lowered == b"transfer-encoding":
            self.chunked = value.lower().endswith(b"chunked")
        elif lowered == b"connection":
            self.connection = value.lower()
        return False

    def framing(self) -> tuple[int | None, bool, bytes]:
        return self.length, self.chunked, self.connection


def _parse_status(line: bytes, call: Call) -> tuple[bytes, int, bytes]:
    parts = line.rstrip(b"\r\n").split(b" ", 2)
    try:
        version, status = parts[0], int(parts[1])
    except (IndexError, ValueError):
        raise httpx.RemoteProtocolError(f"malformed status line {line[:80]!r}",
                                        request=call.request) from None
    if not version.startswith(b"HTTP/1.") or not 100 <= status <= 999:
        raise httpx.RemoteProtocolError(f"malformed status line {line[:80]!r}",
                                        request=call.request)
    return version, status, parts[2] if len(parts) > 2 else b""


def _parse_length(value: bytes, call: Call) -> int:
    try:
        length = int(value)
    except ValueError:
        length = -1
    if length < 0:
        raise httpx.RemoteProtocolError(f"bad Content-Length {value[:40]!r}",
                                        request=call.request)
    return length


def _read_chunked(reader: BinaryIO, call: Call) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = reader.readline(_MAX_LINE + 1)
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise httpx.RemoteProtocolError(f"bad chunk size {size_line[:40]!r}",
                                            request=call.request) from None
        if size == 0:
            break
        chunk = reader.read(size)
        if len(chunk) < size or reader.readline(_MAX_LINE + 1) not in (b"\r\n", b"\n"):
            raise httpx.RemoteProtocolError("chunked body ended early", request=call.request)
        parts.append(chunk)
    while reader.readline(_MAX_LINE + 1) not in (b"\r\n", b"\n", b""):
        pass  # trailers: not used by a JSON call
    return b"".join(parts)

