"""The lean HTTP/1.1 keep-alive transport of ``http_transport.py``, for an event loop.

One per worker process's event loop (``workers/http.py``), shared by every async stage call
on it: per origin a pool of keep-alive connections, at most ``max_connections`` open (the
worker's in-flight bound). A call that finds every connection busy waits for one; it never
fails for want of a connection. Same wire rules as the threads' transport, the header
parsing shared with it: responses framed by Content-Length, chunked coding or the
connection closing; a reused connection the server closed while idle is redialled once, but
only when not a byte of the answer came back; a connection idle longer than
``KEEPALIVE_EXPIRY_S`` is not reused. Timeouts are httpx's: ``connect`` for the dial (and
TLS), ``write`` for sending the request, ``read`` for the whole answer. A call cancelled
mid-exchange closes its connection.

Each connection is an ``asyncio.Protocol``: the answer is parsed from the bytes as they
arrive (``_AnswerParser``), and the call awaits one future for all of it. Reading it line by
line through ``asyncio.StreamReader`` cost a coroutine per header line, a fifth of a call's
CPU at a thousand calls in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
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


class _Answer:
    """What the parser hands the call: one whole answer, and whether the connection may
    carry the next request."""

    __slots__ = ("content", "head", "keep_alive", "reason", "status", "version")

    def __init__(self, version: bytes, status: int, reason: bytes, head: ResponseHead,
                 content: bytes, keep_alive: bool) -> None:
        self.version, self.status, self.reason = version, status, reason
        self.head, self.content, self.keep_alive = head, content, keep_alive


class _AnswerParser:
    """One answer, parsed as far as the bytes received allow (``advance``): the status line
    and headers, then a body framed by Content-Length, chunked coding or the close."""

    def __init__(self, call: Call, reused: bool, done: asyncio.Future[_Answer]) -> None:
        self.call = call
        self.reused = reused  # until a byte of the answer comes
        self.done = done
        self._step: Callable[[_Connection], bool] = self._status_line
        self._version = b""
        self._status = 0
        self._reason = b""
        self._head = ResponseHead(call)
        self._length = 0  # of the body, or of the chunk being read
        self._keep_alive = True
        self._parts: list[bytes] = []

    def advance(self, connection: _Connection) -> None:
        """Parse what has arrived; settle ``done`` with the answer or the error."""
        if self.done.done():
            return
        try:
            while self._step(connection):
                pass
        except (httpx.HTTPError, _Stale) as exc:
            self.done.set_exception(exc)

    def _error(self, message: str) -> httpx.RemoteProtocolError:
        return httpx.RemoteProtocolError(message, request=self.call.request)

    def _status_line(self, connection: _Connection) -> bool:
        line = connection.take_line(self)
        if line is None:
            if connection.ended:
                if self.reused and not connection.received:
                    raise _Stale
                connection.raise_lost(self)
                raise self._error("Server disconnected without sending a response.")
            return False
        self._version, self._status, self._reason = _parse_status(line, self.call)
        self._head = ResponseHead(self.call)
        self._step = self._header_line
        return True

    def _header_line(self, connection: _Connection) -> bool:
        line = connection.take_line(self)
        if line is None:
            if not connection.ended:
                return False
            connection.raise_lost(self)
            line = b""  # ResponseHead calls the headers malformed
        if not self._head.add_line(line):
            return True
        status = self._status
        if 100 <= status < 200 and status != 101:
            self._step = self._status_line  # interim answers come before the real one
            return True
        length, chunked, connection_header = self._head.framing()
        self._keep_alive = (
            b"close" not in connection_header
            if self._version == b"HTTP/1.1"
            else b"keep-alive" in connection_header
        )
        if self.call.method == "HEAD" or status in _NO_BODY_STATUSES or status == 101:
            self._keep_alive = self._keep_alive and status != 101  # not HTTP any more
            self._finish(b"")
            return False
        if chunked:
            self._step = self._chunk_size
        elif length is not None:
            self._length = length
            self._step = self._fixed_body
        else:
            self._keep_alive = False
            self._step = self._body_to_close
        return True

    def _fixed_body(self, connection: _Connection) -> bool:
        body = connection.take(self._length)
        if body is None:
            if connection.ended:
                connection.raise_lost(self)
                raise self._error(f"response body ended after {connection.buffered} of "
                                  f"{self._length} bytes")
            return False
        self._finish(body)
        return False

    def _body_to_close(self, connection: _Connection) -> bool:
        if not connection.ended:
            return False
        connection.raise_lost(self)
        self._finish(connection.take(connection.buffered) or b"")
        return False

    def _chunk_size(self, connection: _Connection) -> bool:
        line = connection.take_line(self)
        if line is None:
            if connection.ended:
                connection.raise_lost(self)
                raise self._error("chunked body ended early")
            return False
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise self._error(f"bad chunk size {line[:40]!r}") from None
        if size == 0:
            self._step = self._trailer_line
        else:
            self._length = size
            self._step = self._chunk_data
        return True

    def _chunk_data(self, connection: _Connection) -> bool:
        # The chunk and the line end after it, together.
        if connection.buffered < self._length + 1:
            if connection.ended:
                connection.raise_lost(self)
                raise self._error("chunked body ended early")
            return False
        chunk = connection.peek(self._length)
        line = connection.line_at(self._length, self)
        if line is None:
            if connection.ended:
                raise self._error("chunked body ended early")
            return False
        if line not in (b"\r\n", b"\n"):
            raise self._error("chunked body ended early")
        connection.take(self._length + len(line))
        self._parts.append(chunk)
        self._step = self._chunk_size
        return True

    def _trailer_line(self, connection: _Connection) -> bool:
        line = connection.take_line(self)
        if line is None:
            if not connection.ended:
                return False
            line = b""
        if line in (b"\r\n", b"\n", b""):  # trailers: not used by a JSON call
            self._finish(b"".join(self._parts))
            return False
        return True

    def _finish(self, content: bytes) -> None:
        self.done.set_result(_Answer(self._version, self._status, self._reason, self._head,
                                     content, self._keep_alive))


class _Connection(asyncio.Protocol):
    """One connection to an origin: the bytes received wait in a buffer until the answer
    in progress (its ``_AnswerParser``) takes them."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.used = False
        self.idle_since = 0.0
        self.ended = False  # the peer closed, or the connection was lost
        self.received = False  # a byte came for the answer in progress
        self._lost: BaseException | None = None
        self._buffer = bytearray()
        self._answer: _AnswerParser | None = None
        self._can_write: asyncio.Future[None] | None = None  # set while writing is paused

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self.received = True
        if self._answer is not None:
            self._answer.advance(self)

    def eof_received(self) -> bool:
        self.ended = True
        if self._answer is not None:
            self._answer.advance(self)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self._lost = exc
        if self._answer is not None:
            self._answer.advance(self)
        self._wake_writer()

    def pause_writing(self) -> None:
        if self._can_write is None:
            self._can_write = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake_writer()

    # -- for the parser ----------------------------------------------------------------
    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def take_line(self, answer: _AnswerParser) -> bytes | None:
        """The next whole line (with its end), or None until one has arrived."""
        return self.line_at(0, answer, take=True)

    def line_at(self, start: int, answer: _AnswerParser, take: bool = False) -> bytes | None:
        end = self._buffer.find(b"\n", start)
        if end < 0:
            if len(self._buffer) - start > _MAX_LINE:
                raise answer._error("response line too long")
            return None
        if end - start + 1 > _MAX_LINE + 1:
            raise answer._error("response line too long")
        line = bytes(self._buffer[start:end + 1])
        if take:
            del self._buffer[:end + 1]
        return line

    def peek(self, size: int) -> bytes:
        return bytes(self._buffer[:size])

    def take(self, size: int) -> bytes | None:
        """The next ``size`` bytes, or None until they have all arrived."""
        if len(self._buffer) < size:
            return None
        taken = bytes(self._buffer[:size])
        del self._buffer[:size]
        return taken

    def raise_lost(self, answer: _AnswerParser) -> None:
        """The error that ended the connection, as httpx's, if it ended with one."""
        exc = self._lost
        if exc is None:
            return
        if answer.reused and not self.received:
            raise _Stale from exc
        raise httpx.ReadError(str(exc), request=answer.call.request) from exc

    # -- for the transport -------------------------------------------------------------
    async def exchange(self, call: Call, timeouts: dict[str, float | None]) -> _Answer:
        """Send ``call`` and wait for its whole answer."""
        assert self.transport is not None
        reused = self.used
        if self.ended:
            if reused:
                raise _Stale
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.",
                                            request=call.request)
        if self._buffer:  # bytes nobody asked for: the connection is out of step
            raise _Stale if reused else httpx.RemoteProtocolError(
                "unexpected bytes before the answer", request=call.request)
        done: asyncio.Future[_Answer] = asyncio.get_running_loop().create_future()
        self.received = False
        self._answer = _AnswerParser(call, reused, done)
        try:
            self.transport.write(call.data)
            if self._can_write is not None:  # the kernel's buffer is full: wait for room
                try:
                    async with asyncio.timeout(timeouts.get("write")):
                        await self._can_write
                except TimeoutError as exc:
                    raise httpx.WriteTimeout("write timed out", request=call.request) from exc
                if self.ended and not self.received:
                    if reused:
                        raise _Stale
                    raise httpx.WriteError(str(self._lost or "connection closed"),
                                           request=call.request)
            self._answer.advance(self)  # the answer (or the close) may be here already
            try:
                async with asyncio.timeout(timeouts.get("read")):
                    return await done
            except TimeoutError as exc:
                raise httpx.ReadTimeout("read timed out", request=call.request) from exc
        finally:
            self._answer = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _wake_writer(self) -> None:
        waiter, self._can_write = self._can_write, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _OriginPool:
    """One origin's idle connections, and a slot per connection that may be open. A free
    slot is taken without a suspension (the common case: the pool is as wide as the
    process's in-flight bound); a call that finds none waits in line, and a slot given back
    goes straight to the first in line."""

    def __init__(self, max_connections: int) -> None:
        self.free = max_connections
        self.waiting: deque[asyncio.Future[None]] = deque()
        self.idle: deque[_Connection] = deque()
        self.open = 0  # idle or in use

    async def take_slot(self) -> None:
        if self.free > 0 and not self.waiting:
            self.free -= 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.give_slot()  # handed a slot just as the call was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self.waiting.remove(turn)
            raise

    def give_slot(self) -> None:
        while self.waiting:
            turn = self.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.free += 1

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
        await pool.take_slot()  # a free slot: an idle connection, or room to dial one
        try:
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
        finally:
            pool.give_slot()

    def _take_idle(self, pool: _OriginPool) -> _Connection | None:
        now = self._clock()
        while pool.idle:
            connection = pool.idle.pop()  # the most recently used: the least likely stale
            if now - connection.idle_since <= self.keepalive_expiry_s and not connection.ended:
                return connection
            pool.discard(connection)  # idle too long to trust, or closed by the server
        return None

    async def _exchange(
        self, connection: _Connection, pool: _OriginPool, call: Call,
        timeouts: dict[str, float | None],
    ) -> httpx.Response:
        try:
            answer = await connection.exchange(call, timeouts)
        except BaseException:  # cancelled too: a half-read answer must not be reused
            pool.discard(connection)
            raise
        if answer.keep_alive and not connection.ended:
            connection.used = True
            connection.idle_since = self._clock()
            pool.idle.append(connection)
        else:
            pool.discard(connection)
        return httpx.Response(
            answer.status,
            headers=answer.head.headers,
            stream=httpx.ByteStream(answer.content),
            request=call.made,
            extensions={"http_version": answer.version, "reason_phrase": answer.reason},
        )

    async def aclose(self) -> None:
        for pool in self._pools.values():
            while pool.idle:
                pool.discard(pool.idle.pop())


async def _dial(origin: Origin, timeouts: dict[str, float | None]) -> _Connection:
    scheme, host, port = origin
    hostname = host.decode("ascii")
    tls: ssl.SSLContext | None = _tls_context() if scheme == b"https" else None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeouts.get("connect")):
            _, connection = await loop.create_connection(
                _Connection, hostname, port, ssl=tls,
                server_hostname=hostname if tls else None,
            )
    except TimeoutError as exc:
        raise httpx.ConnectTimeout("connect timed out") from exc
    except OSError as exc:  # ssl.SSLError is an OSError
        raise httpx.ConnectError(str(exc)) from exc
    return connection


def origin_of(url: str) -> Origin:
    """The pool key of ``url`` (for tests and stats)."""
    parsed = httpx.URL(url)
    return (parsed.raw_scheme, parsed.raw_host,
            parsed.port or (443 if parsed.scheme == "https" else 80))
