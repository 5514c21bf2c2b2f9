"""The lean HTTP/1.1 keep-alive transport of ``http_transport.py``, for an event loop.

One per worker process's event loop (``workers/http.py``), shared by every async stage call
on it: per origin a pool of keep-alive connections, at most ``max_connections`` open (the
worker's in-flight bound). A call that finds every connection busy waits for one; it never
fails for want of a connection. Same wire rules as the threads' transport, the parsing shared
with it: responses framed by Content-Length, chunked coding or the connection closing;
a reused connection the server closed while idle is redialled once, but only when not a byte
of the answer came back; a connection idle longer than ``KEEPALIVE_EXPIRY_S`` is not reused.
Timeouts are httpx's: ``connect`` for the dial (and TLS), ``write`` for sending the request,
``read`` for the whole answer. A call cancelled mid-exchange closes its connection.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable

import httpx

from workers.http_transport import (
    _MAX_LINE,
    _NO_BODY_STATUSES,
    KEEPALIVE_EXPIRY_S,
    Call,
    Origin,
    ResponseHead,
    _parse_status,
    _tls_context,
)


class _Stale(Exception):
    """A reused connection gave no answer at all: the server had closed it while idle."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.used = False
        self.idle_since = 0.0

    def close(self) -> None:
        self.writer.close()


class _OriginPool:
    """One origin's idle connections, and a slot per connection that may be open."""

    def __init__(self, max_connections: int) -> None:
        self.slots = asyncio.Semaphore(max_connections)
        self.idle: deque[_Connection] = deque()
        self.open = 0  # idle or in use

    def discard(self, connection: _Connection) -> None:
        connection.close()
        self.open -= 1


class AsyncKeepAliveTransport(httpx.AsyncBaseTransport):
    """An ``httpx`` async transport for one event loop: keep-alive connections per origin,
    at most ``max_connections`` of them open."""

    def __init__(
        self, max_connections: int, keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections!r}")
        self.max_connections = max_connections
        self.keepalive_expiry_s = keepalive_expiry_s
        self._clock = clock
        self._pools: dict[Origin, _OriginPool] = {}

    def open_connections(self, origin: Origin) -> int:
        """Connections open to ``origin`` now, idle or in use (for tests)."""
        pool = self._pools.get(origin)
        return 0 if pool is None else pool.open

    async def fetch(
        self, request: httpx.Request, timeouts: dict[str, float | None]
    ) -> httpx.Response:
        """``request`` with these timeouts (httpx.Timeout(...).as_dict()), its body read."""
        await request.aread()
        return await self.send(Call.of(request), timeouts)

    async def send(self, call: Call, timeouts: dict[str, float | None]) -> httpx.Response:
        """``call`` with these timeouts, its answer's body read."""
        response = await self._send(call, timeouts)
        response.read()  # in memory already: httpx only decodes it (sync is cheaper)
        return response

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        return await self._send(Call.of(request), request.extensions.get("timeout", {}))

    async def _send(self, call: Call, timeouts: dict[str, float | None]) -> httpx.Response:
        pool = self._pools.get(call.origin)
        if pool is None:
            pool = self._pools[call.origin] = _OriginPool(self.max_connections)
        async with pool.slots:  # a free slot: an idle connection, or room to dial one
            connection = self._take_idle(pool)
            if connection is not None:
                try:
                    return await self._exchange(connection, pool, call, timeouts)
                except _Stale:
                    pass  # the server dropped it while idle: dial afresh, once
            connection = await _dial(call.origin, timeouts)
            pool.open += 1
            try:
                return await self._exchange(connection, pool, call, timeouts)
            except _Stale as exc:
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a response.", request=call.request
                ) from exc

    def _take_idle(self, pool: _OriginPool) -> _Connection | None:
        now = self._clock()
        while pool.idle:
            connection = pool.idle.pop()  # the most recently used: the least likely stale
            if now - connection.idle_since <= self.keepalive_expiry_s:
                return connection
            pool.discard(connection)  # idle too long to trust
        return None

    async def _exchange(
        self, connection: _Connection, pool: _OriginPool, call: Call,
        timeouts: dict[str, float | None],
    ) -> httpx.Response:
        reused = connection.used
        try:
            connection.writer.write(call.data)
            if connection.writer.transport.get_write_buffer_size():  # not all sent at once
                try:
                    async with asyncio.timeout(timeouts.get("write")):
                        await connection.writer.drain()
                except TimeoutError as exc:
                    raise httpx.WriteTimeout("write timed out", request=call.request) from exc
                except OSError as exc:
                    if reused:
                        raise _Stale from exc
                    raise httpx.WriteError(str(exc), request=call.request) from exc
            try:
                async with asyncio.timeout(timeouts.get("read")):
                    response, keep_alive = await _read_response(connection.reader, call, reused)
            except TimeoutError as exc:
                raise httpx.ReadTimeout("read timed out", request=call.request) from exc
            except OSError as exc:  # reset, TLS errors
                raise httpx.ReadError(str(exc), request=call.request) from exc
        except BaseException:  # cancelled too: a half-read answer must not be reused
            pool.discard(connection)
            raise
        if keep_alive:
            connection.used = True
            connection.idle_since = self._clock()
            pool.idle.append(connection)
        else:
            pool.discard(connection)
        return response

    async def aclose(self) -> None:
        for pool in self._pools.values():
            while pool.idle:
                pool.discard(pool.idle.pop())


async def _dial(origin: Origin, timeouts: dict[str, float | None]) -> _Connection:
    scheme, host, port = origin
    hostname = host.decode("ascii")
    tls: ssl.SSLContext | None = _tls_context() if scheme == b"https" else None
    try:
        async with asyncio.timeout(timeouts.get("connect")):
            reader, writer = await asyncio.open_connection(
                hostname, port, ssl=tls, server_hostname=hostname if tls else None,
                limit=_MAX_LINE + 1,
            )
    except TimeoutError as exc:
        raise httpx.ConnectTimeout("connect timed out") from exc
    except OSError as exc:  # ssl.SSLError is an OSError
        raise httpx.ConnectError(str(exc)) from exc
    return _Connection(reader, writer)


async def _read_response(
    reader: asyncio.StreamReader, call: Call, reused: bool
) -> tuple[httpx.Response, bool]:
    """Read one answer; also say whether the connection may carry the next request."""
    while True:
        version, status, reason, head = await _read_head(reader, call, reused)
        reused = False  # a byte of the answer came: the connection was not stale
        if not 100 <= status < 200 or status == 101:
            break  # interim answers (100 Continue, 103 Early Hints) come before the real one
    length, chunked, connection_header = head.framing()
    keep_alive = (
        b"close" not in connection_header
        if version == b"HTTP/1.1"
        else b"keep-alive" in connection_header
    )
    if call.method == "HEAD" or status in _NO_BODY_STATUSES or status == 101:
        content = b""
        keep_alive = keep_alive and status != 101  # switched protocols: not HTTP any more
    elif chunked:
        content = await _read_chunked(reader, call)
    elif length is not None:
        try:
            content = await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise httpx.RemoteProtocolError(
                f"response body ended after {len(exc.partial)} of {length} bytes",
                request=call.request,
            ) from None
    else:
        content = await reader.read()  # framed by the server closing the connection
        keep_alive = False
    response = httpx.Response(
        status,
        headers=head.headers,
        stream=httpx.ByteStream(content),
        request=call.made,
        extensions={"http_version": version, "reason_phrase": reason},
    )
    return response, keep_alive


async def _readline(reader: asyncio.StreamReader, call: Call) -> bytes:
    try:
        return await reader.readline()
    except ValueError:  # longer than the reader's limit
        raise httpx.RemoteProtocolError("response line too long", request=call.request) from None


async def _read_head(
    reader: asyncio.StreamReader, call: Call, reused: bool
) -> tuple[bytes, int, bytes, ResponseHead]:
    try:
        status_line = await _readline(reader, call)
    except (ConnectionError, ssl.SSLEOFError):  # a TLS peer that closed without close_notify
        if reused:
            raise _Stale from None
        raise
    if not status_line:
        if reused:
            raise _Stale
        raise httpx.RemoteProtocolError(
            "Server disconnected without sending a response.", request=call.request
        )
    version, status, reason = _parse_status(status_line, call)
    head = ResponseHead(call)
    try:  # reader.readline itself: a coroutine less per header line
        while not head.add_line(await reader.readline()):
            pass
    except ValueError:  # longer than the reader's limit
        raise httpx.RemoteProtocolError("response line too long", request=call.request) from None
    return version, status, reason, head


async def _read_chunked(reader: asyncio.StreamReader, call: Call) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = await _readline(reader, call)
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise httpx.RemoteProtocolError(f"bad chunk size {size_line[:40]!r}",
                                            request=call.request) from None
        if size == 0:
            break
        try:
            chunk = await reader.readexactly(size)
        except asyncio.IncompleteReadError:
            raise httpx.RemoteProtocolError("chunked body ended early",
                                            request=call.request) from None
        if await _readline(reader, call) not in (b"\r\n", b"\n"):
            raise httpx.RemoteProtocolError("chunked body ended early", request=call.request)
        parts.append(chunk)
    while await _readline(reader, call) not in (b"\r\n", b"\n", b""):
        pass  # trailers: not used by a JSON call
    return b"".join(parts)


def origin_of(url: str) -> Origin:
    """The pool key of ``url`` (for tests and stats)."""
    parsed = httpx.URL(url)
    return (parsed.raw_scheme, parsed.raw_host,
            parsed.port or (443 if parsed.scheme == "https" else 80))

