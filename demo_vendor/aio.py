"""The vendor's HTTP layer on aiohttp's low-level server (``aiohttp.web.Server``).

No application, router or middlewares: every request goes to one handler that
converts it to the vendor's own ``Request``, calls the vendor's router and
turns the ``Response`` back into JSON.  aiohttp does the HTTP/1.1 work
(parsing in C, keep-alive, pipelining, ``Connection: close``, chunked bodies).
"""

from __future__ import annotations

import sys
import traceback
from urllib.parse import parse_qsl

from aiohttp import web

from .http import Handler, Listening, Request, Response, json_body

# Shutdown waits this long for in-flight handlers, then cancels them (stalls).
SHUTDOWN_GRACE_S = 0.1


class AiohttpServer(Listening):
    """Serves ``handler`` with aiohttp; same interface as the builtin server."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._runner: web.ServerRunner | None = None
        self.host = ""
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        server = web.Server(
            self._handle,
            access_log=None,  # no per-request logging work
            # Idle keep-alive connections stay open an hour (the builtin server never
            # closes them): pooled clients then rarely race a server-side close.
            keepalive_timeout=3600,
        )
        runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_GRACE_S)
        await runner.setup()
        # A large backlog so a burst of hundreds of simultaneous connects is
        # not dropped into the kernel's 1 s SYN retry.
        site = web.TCPSite(runner, host, port, backlog=1024)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        sockname = runner.addresses[0]
        self.host, self.port = sockname[0], sockname[1]

    async def close(self) -> None:
        """Stop listening; in-flight requests get a short grace, then are cancelled."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        target = request.raw_path  # the request-target as sent, query included
        path, _, query_text = target.partition("?")
        query = dict(parse_qsl(query_text, keep_blank_values=True)) if query_text else {}
        body = b""
        if request.body_exists:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return _json(Response(413, {"error": "request body too large"}))
        vendor_request = Request(request.method, target, path, query, request.headers, body)
        try:
            response = await self._handler(vendor_request)
        except Exception:  # a handler bug answers 500 like the builtin server
            traceback.print_exc(file=sys.stderr)
            response = Response(500, {"error": "internal error"})
        return _json(response)


def _json(response: Response) -> web.Response:
    return web.Response(
        status=response.status,
        body=json_body(response.payload),
        content_type="application/json",
        headers=response.headers or None,
    )
