"""Routing, endpoint handlers and fault injection for the demo vendor.

Per non-admin request the order is fixed (tests rely on it):
count arrival -> rate limit (429: a ``burst_429`` first, then the global ``rate_limit_rps``
and the API key's ``key_rate_limit_rps`` together) -> latency -> 404 (unknown route,
``not_found_paths``) -> stall -> injected 500 -> handler.
A request's API key is the token of its ``Authorization: Bearer <token>`` header, "-"
without one. Admin endpoints (``/_admin/...``) skip all of it and are never counted.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from urllib.parse import unquote

from . import data
from .config import ConfigError, VendorConfig
from .http import HttpServer, Listener, Request, Response
from .stats import NO_KEY, RateLimiter, Stats

MAX_LIMIT = 100
SERVERS: tuple[str, ...] = ("builtin", "aiohttp")  # HTTP layers; the first is the default
_DAY_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _api_key(request: Request) -> str:
    """The token of ``Authorization: Bearer <token>``, or "-" without a bearer token."""
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else NO_KEY


class HttpError(Exception):
    """Raised by handlers to answer with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> Response:
    return Response(status, {"error": message})


def _valid_day(value: str | None) -> str:
    if value is None:
        raise HttpError(400, "missing day (expected ?day=YYYY-MM-DD)")
    try:
        if not _DAY_RE.fullmatch(value):
            raise ValueError
        date.fromisoformat(value)
    except ValueError:
        raise HttpError(400, f"bad day {value!r} (expected YYYY-MM-DD)") from None
    return value


def _positive_int(value: object, what: str) -> int:
    # isascii: "²".isdigit() is True but int("²") fails.
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 10:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HttpError(400, f"{what} must be an integer >= 1")
    return value


def _json_object(request: Request) -> dict[str, object]:
    try:
        body = request.json()
    except ValueError:
        raise HttpError(400, "body must be a JSON object") from None
    if not isinstance(body, dict):
        raise HttpError(400, "body must be a JSON object")
    return body


Handler = Callable[["VendorApp", Request, list[str]], Response]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: tuple[str, ...]  # "*" matches one path segment
    endpoint: str
    handler: Handler


def _match(pattern: tuple[str, ...], segments: list[str]) -> list[str] | None:
    if len(pattern) != len(segments):
        return None
    captured: list[str] = []
    for want, got in zip(pattern, segments, strict=True):
        if want == "*":
            captured.append(got)
        elif want != got:
            return None
    return captured


class VendorApp:
    """All mutable vendor state: config, stats, fault and report counters."""

    def __init__(self, config: VendorConfig | None = None) -> None:
        self.config = config if config is not None else VendorConfig()
        self.stats = Stats()
        self.limiter = RateLimiter()
        self.key_limiters: dict[str, RateLimiter] = {}
        self.fault_hits: Counter[str] = Counter()  # injected 500s per path key
        self.report_polls: Counter[str] = Counter()
        self.reports: dict[str, tuple[str, str]] = {}  # id -> (account, day)

    def reset(self) -> None:
        """Clear stats, transient-fault counters and report poll counters.

        Config (including pending ``fail_paths``) and already created
        reports are kept: reset is for "start counting from here".
        """
        self.stats.reset()
        self.limiter.reset()
        self.key_limiters.clear()
        self.fault_hits.clear()
        self.report_polls.clear()

    # -- dispatch ---------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        segments = [unquote(s) for s in request.path.split("/") if s]
        if segments and segments[0] == "_admin":
            return self._admin(request, segments)
        route, args, method_ok = self._route(request.method, segments)
        key = request.path
        if route is not None and route.endpoint == "metrics":
            # Per-day key so tests can count fetches of each metric-day.
            key = f"{request.path}?day={request.query.get('day', '')}"
        api_key = _api_key(request)
        now = time.monotonic()
        stats = self.stats
        stats.arrived(now, route.endpoint if route else None, key, api_key)
        try:
            response = self._rate_limit(api_key, now)
            quota = self._quota_headers(api_key, now)
            if response is None:
                response = await self._pipeline(request, route, args, method_ok, key)
            response.headers.extend(quota)
            stats.answered(response.status, now, api_key)
        finally:
            stats.finished()
        return response

    def _route(self, method: str, segments: list[str]) -> tuple[Route | None, list[str], bool]:
        path_matched = False
        for route in ROUTES:
            args = _match(route.pattern, segments)
            if args is None:
                continue
            if route.method == method:
                return route, args, True
            path_matched = True
        return None, [], not path_matched

    def _rate_limit(self, api_key: str, now: float) -> Response | None:
        """A 429 for a request arriving at ``now``, or None if every limit admits it."""
        cfg = self.config
        burst = cfg.burst_429
        count = int(burst["count"])
        if count > 0 and burst.get("key", api_key) == api_key:
            burst["count"] = count - 1
            seconds = float(burst["retry_after_s"])
            if cfg.retry_after_integer:
                return self._too_many_requests(str(math.ceil(seconds)))
            # As configured: "2", "1.5", "0.25".
            return self._too_many_requests(f"{seconds:.2f}".rstrip("0").rstrip("."))
        key_limiter = self._key_limiter(api_key) if cfg.key_rate_limit_rps > 0 else None
        # Both asked before either counts the request: one refused uses no capacity of either.
        waits = [w for w in (
            self.limiter.wait(cfg.rate_limit_rps, now),
            key_limiter.wait(cfg.key_rate_limit_rps, now) if key_limiter else None,
        ) if w is not None]
        if waits:
            wait = max(waits)
            if cfg.retry_after_integer:
                return self._too_many_requests(str(max(1, math.ceil(wait))))
            # Decimal seconds; never "0.00", which would invite a hot retry loop.
            return self._too_many_requests(f"{max(wait, 0.01):.2f}")
        if cfg.rate_limit_rps > 0:
            self.limiter.admit(now)
        if key_limiter is not None:
            key_limiter.admit(now)
        return None

    def _key_limiter(self, api_key: str) -> RateLimiter:
        limiter = self.key_limiters.get(api_key)
        if limiter is None:
            limiter = self.key_limiters[api_key] = RateLimiter()
        return limiter

    def _quota_headers(self, api_key: str, now: float) -> list[tuple[str, str]]:
        """With ``rate_limit_headers`` on, the quota left under the tighter limit in force
        (fewer remaining; the key's on a tie), after this request: RateLimit-* (IETF draft)
        and X-RateLimit-*, Reset in whole seconds from now, rounded up."""
        cfg = self.config
        if not cfg.rate_limit_headers:
            return []
        quotas = []
        if cfg.key_rate_limit_rps > 0:
            quotas.append(self._key_limiter(api_key).quota(cfg.key_rate_limit_rps, now))
        if cfg.rate_limit_rps > 0:
            quotas.append(self.limiter.quota(cfg.rate_limit_rps, now))
        if not quotas:
            return []
        limit, remaining, reset_s = min(quotas, key=lambda q: q[1])
        reset = str(math.ceil(reset_s - 1e-9))
        return [("RateLimit-Limit", str(limit)), ("RateLimit-Remaining", str(remaining)),
                ("RateLimit-Reset", reset), ("X-RateLimit-Remaining", str(remaining)),
                ("X-RateLimit-Reset", reset)]

    async def _pipeline(
        self,
        request: Request,
        route: Route | None,
        args: list[str],
        method_ok: bool,
        key: str,
    ) -> Response:
        cfg = self.config
        if cfg.latency_ms > 0:
            await asyncio.sleep(cfg.latency_ms / 1000)
        if route is None:
            if method_ok:
                return _error(404, "not found")
            return _error(405, "method not allowed")
        if cfg.not_found_paths and key in cfg.not_found_paths:
            return _error(404, "not found")
        if cfg.stall_ms > 0 and (
            key in cfg.stall_paths or data.fault_hit(cfg.seed, "stall", key, cfg.stall_rate)
        ):
            await asyncio.sleep(cfg.stall_ms / 1000)
        if self._inject_failure(key):
            return _error(500, "injected failure")
        try:
            return route.handler(self, request, args)
        except HttpError as exc:
            return _error(exc.status, exc.message)

    def _too_many_requests(self, retry_after: str) -> Response:
        """A 429 with ``Retry-After: retry_after``; its window goes into the stats."""
        self.stats.announced(time.monotonic(), float(retry_after))
        return Response(429, {"error": "rate limited"}, [("Retry-After", retry_after)])

    def _inject_failure(self, key: str) -> bool:
        cfg = self.config
        remaining = cfg.fail_paths.get(key, 0)
        if remaining > 0:
            cfg.fail_paths[key] = remaining - 1
            return True
        if not data.fault_hit(cfg.seed, "err", key, cfg.error_rate):
            return False
        if cfg.error_times == 0:
            return True  # permanent fault
        if self.fault_hits[key] < cfg.error_times:
            self.fault_hits[key] += 1
            return True
        return False

    # -- admin ------------------------------------------------------------

    def _admin(self, request: Request, segments: list[str]) -> Response:
        action = (request.method, "/".join(segments[1:]))
        if action == ("GET", "stats"):
            return Response(200, self.stats.snapshot(time.monotonic()))
        if action == ("POST", "reset"):
            self.reset()
            return Response(200, {"ok": True})
        if action == ("GET", "config"):
            return Response(200, self.config.to_dict())
        if action == ("POST", "config"):
            try:
                self.config.update(_json_object(request))
            except HttpError as exc:
                return _error(exc.status, exc.message)
            except ConfigError as exc:
                return _error(400, str(exc))
            return Response(200, self.config.to_dict())
        return _error(404, "not found")

    # -- endpoint handlers --------------------------------------------------

    def _account(self, account: str) -> str:
        if data.account_number(account, self.config.accounts) is None:
            raise HttpError(404, f"unknown account {account!r}")
        return account

    def list_accounts(self, request: Request, args: list[str]) -> Response:
        cfg = self.config
        return Response(200, {"accounts": data.accounts(cfg.accounts, cfg.account_tokens)})

    def list_services(self, request: Request, args: list[str]) -> Response:
        cfg = self.config
        account = self._account(args[0])
        offset = 0
        cursor = request.query.get("cursor")
        if cursor:
            try:
                offset = data.decode_cursor(cursor)
            except ValueError:
                raise HttpError(400, "bad cursor") from None
        limit = cfg.page_size
        if "limit" in request.query:
            limit = _positive_int(request.query["limit"], "limit")
        limit = min(limit, MAX_LIMIT)
        end = min(offset + limit, cfg.services)
        page = [
            {"id": sid, "metric": data.service_metric(cfg.seed, account, sid, cfg.metrics)}
            for sid in (data.service_id(n) for n in range(offset + 1, end + 1))
        ]
        next_cursor = data.encode_cursor(end) if end < cfg.services else None
        return Response(200, {"services": page, "next_cursor": next_cursor})

    def get_metric(self, request: Request, args: list[str]) -> Response:
        cfg = self.config
        account = self._account(args[0])
        service = args[1]
        if data.service_number(service, cfg.services) is None:
            raise HttpError(404, f"unknown service {service!r}")
        day = _valid_day(request.query.get("day"))
        return Response(
            200,
            {
                "account": account,
                "service": service,
                "metric": data.service_metric(cfg.seed, account, service, cfg.metrics),
                "day": day,
                "value": data.metric_value(cfg.seed, account, service, day),
            },
        )

    def create_report(self, request: Request, args: list[str]) -> Response:
        body = _json_object(request)
        account, day = body.get("account"), body.get("day")
        if not isinstance(account, str):
            raise HttpError(400, "account must be a string")
        self._account(account)
        day = _valid_day(day if isinstance(day, str) else None)
        rid = data.report_id(account, day)
        self.reports[rid] = (account, day)
        return Response(202, {"report_id": rid, "status": "pending"})

    def poll_report(self, request: Request, args: list[str]) -> Response:
        cfg = self.config
        rid = args[0]
        if rid not in self.reports:
            raise HttpError(404, f"unknown report {rid!r}")
        polls = self.report_polls[rid]
        if polls < cfg.report_polls:
            self.report_polls[rid] = polls + 1
            return Response(200, {"report_id": rid, "status": "pending"})
        account, day = self.reports[rid]
        rows = data.report_rows(cfg.seed, account, day, cfg.services, cfg.metrics)
        return Response(
            200,
            {"report_id": rid, "status": "ready", "account": account, "day": day, "rows": rows},
        )

    def _fib(self, n: int) -> Response:
        if n > data.FIB_MAX_N:
            raise HttpError(400, f"n must be <= {data.FIB_MAX_N}")
        return Response(200, {"n": n, "value": data.fib(n)})

    def get_fib(self, request: Request, args: list[str]) -> Response:
        return self._fib(_positive_int(args[0], "n"))

    def post_fib(self, request: Request, args: list[str]) -> Response:
        return self._fib(_positive_int(_json_object(request).get("nth"), "nth"))

    def get_repo(self, request: Request, args: list[str]) -> Response:
        owner, name = args
        return Response(
            200,
            {
                "full_name": f"{owner}/{name}",
                "stargazers_count": data.stars(self.config.seed, owner, name),
            },
        )


ROUTES: tuple[Route, ...] = (
    Route("GET", ("accounts",), "accounts", VendorApp.list_accounts),
    Route("GET", ("accounts", "*", "services"), "services", VendorApp.list_services),
    Route("GET", ("accounts", "*", "services", "*", "metrics"), "metrics", VendorApp.get_metric),
    Route("POST", ("reports",), "reports_create", VendorApp.create_report),
    Route("GET", ("reports", "*"), "reports_poll", VendorApp.poll_report),
    Route("GET", ("fib", "*"), "fib", VendorApp.get_fib),
    Route("POST", ("fib",), "fib", VendorApp.post_fib),
    Route("GET", ("repos", "*", "*"), "repos", VendorApp.get_repo),
)


class VendorServer:
    """A running vendor: the app state plus its listening HTTP server."""

    def __init__(self, app: VendorApp, server: Listener) -> None:
        self.app = app
        self.server = server

    @property
    def url(self) -> str:
        return self.server.url

    async def close(self) -> None:
        await self.server.close()


async def start_vendor(
    config: VendorConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    server: str = SERVERS[0],
) -> VendorServer:
    """Start listening (``port=0`` picks a free port) and return at once.

    ``server`` picks the HTTP layer: "builtin" (the stdlib asyncio server in
    ``http.py``) or "aiohttp" (``aio.py``); both serve the same ``VendorApp``.
    """
    app = VendorApp(config)
    http: Listener
    if server == "builtin":
        http = HttpServer(app.handle)
    elif server == "aiohttp":
        try:  # imported only when chosen: aiohttp is optional, and loads slowly
            from .aio import AiohttpServer
        except ImportError as exc:
            raise ConfigError(f"--server aiohttp needs aiohttp: pip install 'fanout[aiohttp]' "
                              f"({exc})") from None

        http = AiohttpServer(app.handle)
    else:
        raise ValueError(f"server must be one of {', '.join(SERVERS)}")
    await http.start(host, port)
    return VendorServer(app, http)


async def serve(
    config: VendorConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
    server: str = SERVERS[0],
) -> None:
    """Serve until ``stop`` is set (forever if None); ``on_ready(url)`` once listening."""
    vendor = await start_vendor(config, host, port, server)
    try:
        if on_ready is not None:
            on_ready(vendor.url)
        await (stop or asyncio.Event()).wait()
    finally:
        await vendor.close()
