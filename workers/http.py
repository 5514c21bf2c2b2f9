"""JSON calls to the vendor with tenacity retries: ``request_json`` over one keep-alive
transport per thread, ``request_json_async`` (for ``async def`` stages) over one pooled
transport per event loop (``http_async_transport.py``).

Retried: connect/read timeouts, transport errors, 5xx, 408 and 429 (honouring
``Retry-After``), with exponential backoff and jitter. Never retried: other 4xx, which are
permanent (the stage fails at once, whatever its retries). What finally fails raises
``VendorHTTPError`` carrying the status and a short excerpt of the body. Every try is counted
per thread, or per asyncio task (``tries``, a context variable), so a failed item reports its
HTTP retries too. A proxy named in the
environment (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY) is honoured as httpx honours it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
import urllib.request
import weakref
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from workers.event_loop import max_in_flight
from workers.http_async_transport import AsyncKeepAliveTransport
from workers.http_transport import Call, KeepAliveTransport, plain_get
from workers.limits import LimitRef
from workers.policy.retry import RetryAfter
from workers.settings import get_settings
from workers.throttle import throttle

_BODY_EXCERPT_CHARS = 200


class VendorHTTPError(RetryAfter):
    """The vendor answered with an error status (``retry_after_s``: its Retry-After)."""

    def __init__(self, status: int, url: str, body: str, retry_after_s: float | None = None):
        self.status = status
        self.url = url
        self.body_excerpt = body[:_BODY_EXCERPT_CHARS]
        self.retry_after_s = retry_after_s
        super().__init__(f"HTTP {status} from {url}: {self.body_excerpt}")

    @property
    def permanent(self) -> bool:
        """A 4xx other than 408 and 429: asking again gets the same answer."""
        return 400 <= self.status < 500 and self.status not in (408, 429)


#: HTTP tries of the item running in this thread or asyncio task (each task of a batch's
#: async items has its own copy of the context).
_tries: contextvars.ContextVar[int] = contextvars.ContextVar("fanout_http_tries", default=0)


def reset_tries() -> None:
    """Start counting this thread's (or task's) HTTP tries afresh (the engine does, per
    item)."""
    _tries.set(0)


def tries() -> int:
    """HTTP tries made by this thread (or task) since ``reset_tries``."""
    return _tries.get()


# Compressed answers are asked for as httpx.Client asks (httpx decodes them when read).
_HEADERS = {"accept": "application/json", "accept-encoding": "gzip, deflate",
            "user-agent": "fanout"}
_local = threading.local()


@dataclass(frozen=True)
class _ThreadHTTP:
    """One worker thread's way to the vendor (a forked child makes its own)."""

    pid: int
    transport: KeepAliveTransport
    timeout: dict[str, Any]  # httpx's request extensions form
    #: When the environment names a proxy: an httpx.Client, which honours it (and NO_PROXY)
    #: as httpx always does; the lean transport has no proxy support.
    proxied: httpx.Client | None

    def prepare(self, url: str) -> None:
        """Pay a first TLS context's cost now (the lean transport's; a client's is paid when
        it is made)."""
        if self.proxied is None:
            self.transport.prepare(url)

    def close(self) -> None:
        self.transport.close()
        if self.proxied is not None:
            self.proxied.close()


def environment_proxies() -> dict[str, str]:
    """The proxies the environment names (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, lower case
    too), as httpx reads them."""
    return {k: v for k, v in urllib.request.getproxies().items() if k in ("http", "https", "all")}


def _thread_http() -> _ThreadHTTP:
    """This thread's way to the vendor, made on its first call.

    Vendor calls go to a lean transport (``http_transport.py``), not through ``httpx.Client``:
    the client's per-request work (cookie jar, auth and redirect machinery, a log line) and
    httpx's pooled transport were most of the ~1 ms of CPU a call cost, and a JSON call from a
    worker thread, one at a time, needs none of it. Behind a proxy they go through a client."""
    entry: _ThreadHTTP | None = getattr(_local, "entry", None)
    if entry is None or entry.pid != os.getpid():
        timeout_s = get_settings().http_timeout_s
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0))
        proxied = httpx.Client(timeout=timeout, headers=_HEADERS) if environment_proxies() \
            else None
        entry = _local.entry = _ThreadHTTP(os.getpid(), KeepAliveTransport(),
                                           timeout.as_dict(), proxied)
    return entry


def _send(method: str, url: str, client: httpx.Client | None, **kwargs: Any) -> httpx.Response:
    if client is not None:
        return client.request(method, url, **kwargs)
    way = _thread_http()
    if way.proxied is not None:
        return way.proxied.request(method, url, **kwargs)
    call = _plain_call(method, url, kwargs) or Call.of(_request(method, url, kwargs))
    return way.transport.send(call, way.timeout)


def _request(method: str, url: str, kwargs: dict[str, Any]) -> httpx.Request:
    """httpx's request, the call's own ``headers`` (e.g. Authorization) over fanout's."""
    headers = httpx.Headers(_HEADERS)
    headers.update(kwargs.get("headers") or {})  # replaces a name whatever its case
    return httpx.Request(method, url, **{**kwargs, "headers": headers})


def _plain_call(method: str, url: str, kwargs: dict[str, Any]) -> Call | None:
    """A plain GET's wire form, made here (``plain_get``: httpx's own request, byte for byte,
    without its URL parsing); None for any other call (``httpx.Request`` makes it)."""
    if method == "GET" and kwargs.keys() <= {"params"}:
        return plain_get(url, kwargs.get("params"), _HEADERS)
    return None


def _counted_send(
    method: str, url: str, client: httpx.Client | None, **kwargs: Any
) -> httpx.Response:
    _tries.set(_tries.get() + 1)
    return _send(method, url, client, **kwargs)


@dataclass(frozen=True)
class _LoopHTTP:
    """One event loop's way to the vendor, shared by every async call on it."""

    transport: AsyncKeepAliveTransport
    timeout: dict[str, Any]  # httpx's request extensions form
    proxied: httpx.AsyncClient | None  # as for threads: when the environment names a proxy


_loop_http: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopHTTP] = \
    weakref.WeakKeyDictionary()
# The last loop asked for and its entry: a worker process has one loop, and the weak
# dictionary's lookup (a new weak reference each time) was a few percent of a call.
_last_loop_http: tuple[weakref.ref[asyncio.AbstractEventLoop], _LoopHTTP] | None = None


def _http_of_loop() -> _LoopHTTP:
    """The running loop's way to the vendor, made on its first call: at most the process's
    in-flight bound of connections per host (``event_loop.max_in_flight``)."""
    global _last_loop_http
    loop = asyncio.get_running_loop()
    last = _last_loop_http
    if last is not None and last[0]() is loop:
        return last[1]
    entry = _loop_http.get(loop)
    if entry is None:
        timeout_s = get_settings().http_timeout_s
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0))
        bound = max_in_flight()
        proxied = httpx.AsyncClient(
            timeout=timeout, headers=_HEADERS,
            limits=httpx.Limits(max_connections=bound, max_keepalive_connections=bound),
        ) if environment_proxies() else None
        entry = _loop_http[loop] = _LoopHTTP(AsyncKeepAliveTransport(bound), timeout.as_dict(),
                                             proxied)
    _last_loop_http = (weakref.ref(loop), entry)
    return entry


async def _counted_send_async(
    method: str, url: str, client: httpx.AsyncClient | None, **kwargs: Any
) -> httpx.Response:
    _tries.set(_tries.get() + 1)
    if client is not None:
        return await client.request(method, url, **kwargs)
    way = _http_of_loop()
    if way.proxied is not None:
        return await way.proxied.request(method, url, **kwargs)
    call = _plain_call(method, url, kwargs)
    if call is None:
        request = _request(method, url, kwargs)
        await request.aread()  # a streamed body may be async
        call = Call.of(request)
    return await way.transport.send(call, way.timeout)


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, VendorHTTPError):
        return not exc.permanent
    return isinstance(exc, httpx.TransportError)  # timeouts, refused, reset


def _retry_after_s(response: httpx.Response) -> float | None:
    raw = response.headers.get("retry-after")
    try:
        return max(0.0, float(raw)) if raw else None
    except ValueError:
        return None


def _wait_s(state: RetryCallState, backoff: wait_exponential_jitter) -> float:
    """Backoff with jitter, but never shorter than the vendor's Retry-After."""
    wait = backoff(state)
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, VendorHTTPError) and exc.retry_after_s is not None:
        wait = max(wait, exc.retry_after_s)
    return wait


def _json_of(response: httpx.Response, url: str, limit: LimitRef | None) -> Any:
    """The answer's JSON, or a ``VendorHTTPError`` (status, body excerpt, Retry-After)."""
    if response.status_code >= 400:
        raise VendorHTTPError(response.status_code, url, response.text,
                              _retry_after_s(response))
    return response.json()


def _pushes_back(error: Exception, limit: LimitRef | None) -> float | None:
    """The Retry-After of a 429 or 503 on a call through ``limit``, or None."""
    if (limit and isinstance(error, VendorHTTPError) and error.retry_after_s is not None
            and error.status in (429, 503)):
        return error.retry_after_s
    return None


def _retry_options(retries: int, backoff_initial_s: float, backoff_max_s: float
                   ) -> dict[str, Any]:
    backoff = wait_exponential_jitter(multiplier=backoff_initial_s, max=backoff_max_s)
    return {
        "stop": stop_after_attempt(retries + 1),
        "retry": retry_if_exception(is_retryable),
        "wait": functools.partial(_wait_s, backoff=backoff),
        "reraise": True,
    }


def request_json(
    method: str,
    url: str,
    *,
    retries: int = 3,
    backoff_initial_s: float = 0.2,
    backoff_max_s: float = 10.0,
    client: httpx.Client | None = None,
    limit: LimitRef | None = None,
    **kwargs: Any,
) -> Any:
    """Call the vendor and return its JSON, retrying what is worth retrying. ``kwargs`` are
    httpx.Request's (params, json, headers, content). ``limit``: a global limit every try
    goes through (``throttle.py``), by name or ``(name, key)`` for one key of a limit used per
    key; the vendor's 429/503 Retry-After pushes it (that key only) back for every worker,
    and a long wait raises ``Throttled`` (the engine runs the item again later)."""
    def attempt() -> Any:
        if limit is None:
            response = _counted_send(method, url, client, **kwargs)
        else:
            if client is None:
                # The process's first TLS context costs tens of ms: pay it before taking a
                # turn, or the call arrives late and bunches with the next one.
                _thread_http().prepare(url)
            with throttle().hold(limit):
                response = _counted_send(method, url, client, **kwargs)
            if response.status_code not in (429, 503):
                throttle().answered(limit, response.headers)
        try:
            return _json_of(response, url, limit)
        except VendorHTTPError as error:
            if limit and error.status in (429, 503):
                throttle().refused(limit, _pushes_back(error, limit))
            raise

    # The first try runs bare: tenacity's set-up was a tenth of a successful call's CPU.
    try:
        return attempt()
    except Exception as exc:
        if retries < 1 or not is_retryable(exc):
            raise
        first_failure = [exc]

    def again() -> Any:
        """The first failure once more (tenacity counts it as try 1 and waits after it, as it
        would have), then real tries."""
        if first_failure:
            raise first_failure.pop()
        return attempt()

    return Retrying(**_retry_options(retries, backoff_initial_s, backoff_max_s))(again)


async def request_json_async(
    method: str,
    url: str,
    *,
    retries: int = 3,
    backoff_initial_s: float = 0.2,
    backoff_max_s: float = 10.0,
    client: httpx.AsyncClient | None = None,
    limit: LimitRef | None = None,
    **kwargs: Any,
) -> Any:
    """``request_json`` for an ``async def`` stage: the same retries (tenacity's
    ``AsyncRetrying``, waiting with ``asyncio.sleep``), the same errors and the same global
    ``limit``, whose waits never block the event loop (``Throttle.hold_async``). The calls of
    one process share a pool of keep-alive connections per host, as many as its in-flight
    bound; ``client``: an ``httpx.AsyncClient`` of the stage's own instead."""
    async def attempt() -> Any:
        if limit is None or await throttle().config_async(limit) is None:  # (read once a second)
            response = await _counted_send_async(method, url, client, **kwargs)
        else:
            async with throttle().hold_async(limit):
                response = await _counted_send_async(method, url, client, **kwargs)
            if response.status_code not in (429, 503):
                await throttle().answered_async(limit, response.headers)
        try:
            return _json_of(response, url, limit)
        except VendorHTTPError as error:
            if limit and error.status in (429, 503):
                await throttle().refused_async(limit, _pushes_back(error, limit))
            raise

    try:  # bare first try, as in request_json
        return await attempt()
    except Exception as exc:
        if retries < 1 or not is_retryable(exc):
            raise
        first_failure = [exc]

    async def again() -> Any:
        if first_failure:
            raise first_failure.pop()
        return await attempt()

    return await AsyncRetrying(**_retry_options(retries, backoff_initial_s, backoff_max_s))(
        again)
