"""The vendor's Request/Response types and its builtin HTTP/1.1 server.

The builtin server is a minimal one on asyncio streams (stdlib only).  It
is the default because it costs less CPU per request than aiohttp
(``aio.py``, ``--server aiohttp``): measured with ``loadcheck.py``.  It
supports what the demo vendor's clients need and no more: keep-alive (the
HTTP/1.1 default), ``Connection: close``, request bodies framed by
``Content-Length``, and JSON responses always framed by ``Content-Length``.
Chunked request bodies are refused with 501 rather than half-supported.
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol
from urllib.parse import parse_qsl

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024

_REASONS: dict[int, str] = {s.value: s.phrase for s in HTTPStatus}


@dataclass(slots=True)
class Request:
    method: str
    target: str  # raw request-target, query string included
    path: str  # percent-encoded path, no query string
    query: dict[str, str]
    headers: Mapping[str, str]  # look up by lower-case name (works on both servers)
    body: bytes = b""

    def json(self) -> object:
        """Decoded JSON body; ValueError when missing or malformed."""
        if not self.body:
            raise ValueError("request body must be JSON")
        return json.loads(self.body)


@dataclass(slots=True)
class Response:
    status: int
    payload: object
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]


class Listener(Protocol):
    """What the vendor needs from an HTTP layer (builtin or aiohttp)."""

    @property
    def url(self) -> str: ...

    async def start(self, host: str, port: int) -> None: ...

    async def close(self) -> None: ...


def json_body(payload: object) -> bytes:
    """The response body both HTTP layers send: compact JSON."""
    return json.dumps(payload, separators=(",", ":")).encode()


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _parse_head(head: bytes) -> tuple[Request, int, bool]:
    """Parse request line + headers -> (request, content length, keep-alive)."""
    # latin-1 never fails to decode, so odd bytes become a 400, not a crash.
    lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(400, "malformed header")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise _BadRequest(501, "transfer-encoding not supported; send Content-Length")
    length_text = headers.get("content-length", "0")
    if not (length_text.isascii() and length_text.isdigit()) or len(length_text) > 12:
        raise _BadRequest(400, "bad content-length")
    length = int(length_text)
    if length > MAX_BODY_BYTES:
        raise _BadRequest(413, "request body too large")
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    # HTTP/1.1 keeps the connection open unless told otherwise; 1.0 the reverse.
    keep_alive = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
    path, _, query_text = target.partition("?")
    query = dict(parse_qsl(query_text, keep_blank_values=True)) if query_text else {}
    return Request(method, target, path, query, headers), length, keep_alive


def encode_response(response: Response, keep_alive: bool) -> bytes:
    body = json_body(response.payload)
    reason = _REASONS.get(response.status, "Unknown")
    head = [
        f"HTTP/1.1 {response.status} {reason}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    head.extend(f"{name}: {value}" for name, value in response.headers)
    if not keep_alive:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class Listening:
    """Where a server listens, once started; both HTTP layers share it."""

    host = ""
    port = 0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


class HttpServer(Listening):
    """Serves ``handler`` over HTTP/1.1; one task per connection."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.host = ""
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        # A large backlog so a burst of hundreds of simultaneous connects is
        # not dropped into the kernel's 1 s SYN retry.
        self._server = await asyncio.start_server(
            self._serve_connection, host, port, limit=MAX_HEAD_BYTES, backlog=1024
        )
        sockname = self._server.sockets[0].getsockname()
        self.host, self.port = sockname[0], sockname[1]

    async def close(self) -> None:
        """Stop listening and cancel open connections (e.g. stalled ones)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._request_loop(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing left to answer
        except asyncio.CancelledError:
            # Shutdown cancelled this connection. Ending normally instead of re-raising keeps
            # Python 3.11's start_server callback from logging a CancelledError traceback.
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _request_loop(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # clean EOF between requests
            except asyncio.LimitOverrunError:
                await _send_error(writer, 431, "request head too large")
                return
            try:
                request, length, keep_alive = _parse_head(head)
            except _BadRequest as exc:
                await _send_error(writer, exc.status, str(exc))
                return
            if length:
                request.body = await reader.readexactly(length)
            response = await self._call_handler(request)
            writer.write(encode_response(response, keep_alive))
            await writer.drain()
            if not keep_alive:
                return

    async def _call_handler(self, request: Request) -> Response:
        try:
            return await self._handler(request)
        except Exception:  # a handler bug must not kill the connection loop
            traceback.print_exc(file=sys.stderr)
            return Response(500, {"error": "internal error"})


async def _send_error(writer: asyncio.StreamWriter, status: int, message: str) -> None:
    # Framing is unknown after a bad head, so answer and close.
    writer.write(encode_response(Response(status, {"error": message}), keep_alive=False))
    await writer.drain()
