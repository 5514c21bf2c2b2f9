"""Scripted HTTP servers on 127.0.0.1 for the vendor HTTP tests (no mocks: real sockets).

- ``ScriptedHTTPServer``: the standard library's threading HTTP/1.1 server, answering each
  request with the next scripted ``Scripted`` response (status, headers, body, delay);
- ``RawServer``: a raw socket server for framing cases: each accepted connection plays the
  next script of ``Reply`` steps (read one request, send these exact bytes, maybe close).

Both record every request (request line, headers, body) and count accepted connections.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, BinaryIO, Self, cast

from workers import http


def reset_thread_transport() -> None:
    """Forget this thread's keep-alive transport (and its cached timeouts), closing it."""
    entry = getattr(http._local, "entry", None)
    if entry is not None:
        del http._local.entry
        entry.close()


@dataclass(frozen=True)
class Recorded:
    """One request as the server read it."""

    connection: int  # 1 for the first accepted connection
    request_line: str
    headers: list[tuple[str, str]]
    body: bytes | None  # None: the body could not be read as its headers framed it

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None


class _Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[Recorded] = []
        self.connections = 0
        self.closed = 0  # connections the server has closed (or seen closed)
        self.eofs = 0  # connections the client closed while the server waited for a request
        self.changed = threading.Condition(self.lock)

    def connected(self) -> int:
        with self.lock:
            self.connections += 1
            return self.connections

    def record(self, request: Recorded) -> None:
        with self.lock:
            self.requests.append(request)

    def connection_closed(self, eof: bool) -> None:
        with self.changed:
            self.closed += 1
            self.eofs += eof
            self.changed.notify_all()

    def wait_closed(self, count: int, timeout_s: float = 2.0) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: self.closed >= count, timeout_s):
                raise AssertionError(f"only {self.closed} of {count} connections closed")


# --- the standard library's server, scripted -----------------------------------------------


@dataclass(frozen=True)
class Scripted:
    """One scripted answer: Content-Length is always added."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay_s: float = 0.0  # wait this long before answering
    close_after: bool = False  # then close the connection without saying so (no header)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, responses: Sequence[Scripted], recorder: _Recorder):
        self.responses = list(responses)
        self.recorder = recorder
        self.stopping = threading.Event()
        self.connection_numbers: dict[Any, int] = {}
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # no getfqdn (a DNS lookup) as HTTPServer does
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connection_numbers[client_address] = self.recorder.connected()
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out and closed is expected here

    def next_response(self) -> Scripted:
        with self.recorder.lock:
            if self.responses:
                return self.responses.pop(0)
        return Scripted(599, body=b"unscripted request")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        server = cast(_Server, self.server)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        server.recorder.record(
            Recorded(
                connection=server.connection_numbers[self.client_address],
                request_line=self.requestline,
                headers=list(self.headers.items()),
                body=body,
            )
        )
        reply = server.next_response()
        if reply.delay_s and server.stopping.wait(reply.delay_s):
            self.close_connection = True
            return
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)
        if reply.close_after:
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _RecordingServer:
    """What both servers share: their URL, what they recorded, and ``with`` closing them."""

    port: int
    scheme = "http"
    _recorder: _Recorder

    def url(self, path: str = "/") -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    @property
    def requests(self) -> list[Recorded]:
        with self._recorder.lock:
            return list(self._recorder.requests)

    @property
    def connections(self) -> int:
        with self._recorder.lock:
            return self._recorder.connections

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ScriptedHTTPServer(_RecordingServer):
    """A real HTTP/1.1 keep-alive server answering requests with scripted responses; with
    ``tls`` (a server-side SSL context), over HTTPS."""

    def __init__(self, responses: Sequence[Scripted], tls: ssl.SSLContext | None = None):
        self._recorder = _Recorder()
        self._server = _Server(responses, self._recorder)
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(2)


# --- a raw socket server ---------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """Read one request, then send ``data`` (None: nothing) and maybe close the connection."""

    data: bytes | None
    close: bool = False
    reset: bool = False  # close with a TCP reset (SO_LINGER 0) instead of a FIN


def response(
    status: str = "200 OK",
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] = (),
    version: str = "HTTP/1.1",
    length: bool = True,
) -> bytes:
    """The bytes of one response (with Content-Length unless ``length`` is False)."""
    lines = [f"{version} {status}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _read_request(reader: BinaryIO, number: int) -> Recorded | None:
    """One request from the client, or None when it closed the connection first."""
    request_line = reader.readline(65536)
    if not request_line:
        return None
    headers: list[tuple[str, str]] = []
    while True:
        line = reader.readline(65536)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    recorded = Recorded(number, request_line.decode("latin-1").rstrip("\r\n"), headers, None)
    te = recorded.header("Transfer-Encoding")
    body: bytes | None
    try:
        if te is not None and te.lower().endswith("chunked"):
            parts = []
            while True:
                size = int(reader.readline(65536).split(b";")[0].strip(), 16)
                if size == 0:
                    while reader.readline(65536) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(reader.read(size))
                reader.readline(65536)
            body = b"".join(parts)
        else:
            body = reader.read(int(recorded.header("Content-Length") or 0))
    except (ValueError, OSError):
        body = None  # unreadable as framed: recorded as such, and the connection is dropped
    return Recorded(number, recorded.request_line, headers, body)


class RawServer(_RecordingServer):
    """Each accepted connection plays the next script in ``scripts`` (a list of ``Reply``).

    When a connection's script ends without closing, the server waits for the client: a
    further request is recorded and the connection closed unanswered; the client closing it
    counts as an EOF (``eofs``). A connection beyond the scripts gets an empty script.
    """

    def __init__(self, scripts: Sequence[Sequence[Reply]], timeout_s: float = 3.0):
        self._scripts = [list(script) for script in scripts]
        self._recorder = _Recorder()
        self._timeout_s = timeout_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._stopping = threading.Event()
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def eofs(self) -> int:
        with self._recorder.lock:
            return self._recorder.eofs

    def requests_per_connection(self) -> list[int]:
        with self._recorder.lock:
            counts = [0] * self._recorder.connections
            for request in self._recorder.requests:
                counts[request.connection - 1] += 1
            return counts

    def wait_closed(self, count: int, timeout_s: float = 2.0) -> None:
        """Wait until ``count`` connections are closed (by either side)."""
        self._recorder.wait_closed(count, timeout_s)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            number = self._recorder.connected()
            with self._recorder.lock:
                script = self._scripts.pop(0) if self._scripts else []
            threading.Thread(target=self._serve, args=(conn, number, script), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int, script: list[Reply]) -> None:
        eof = False
        conn.settimeout(self._timeout_s)
        reader = conn.makefile("rb")
        try:
            for step in script:
                request = _read_request(reader, number)
                if request is None:
                    eof = True
                    return
                self._recorder.record(request)
                if request.body is None:
                    return
                if step.data is not None:
                    conn.sendall(step.data)
                if step.close:
                    if step.reset:
                        linger = struct.pack("ii", 1, 0)
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    return
            request = _read_request(reader, number)
            if request is None:
                eof = True
            else:
                self._recorder.record(request)
        except OSError:
            pass
        finally:
            reader.close()
            conn.close()
            self._recorder.connection_closed(eof)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(2)
        self._listener.close()
