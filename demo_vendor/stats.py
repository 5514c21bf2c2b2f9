"""Request statistics and the sliding one-second window they share with the
rate limiter: totals, per API key (``by_key``) and per whole second (``per_second``).

Admin requests never reach this module: tests read ``/_admin/stats`` to count
exactly what the client under test sent.
"""

from __future__ import annotations

import math
from collections import Counter, deque

ENDPOINTS: tuple[str, ...] = (
    "accounts",
    "services",
    "metrics",
    "reports_create",
    "reports_poll",
    "fib",
    "repos",
)


class SlidingWindow:
    """Timestamps (monotonic seconds) seen within the last ``span`` seconds.

    A true sliding window rather than calendar buckets: a burst straddling a
    second boundary is still seen as one burst.
    """

    def __init__(self, span: float = 1.0) -> None:
        self.span = span
        self._times: deque[float] = deque()

    def _expire(self, now: float) -> None:
        times = self._times
        while times and now - times[0] >= self.span:
            times.popleft()

    def count(self, now: float) -> int:
        self._expire(now)
        return len(self._times)

    def add(self, now: float) -> int:
        """Record an event at ``now``; returns the events now in the window."""
        self._expire(now)
        self._times.append(now)
        return len(self._times)

    def oldest(self) -> float | None:
        return self._times[0] if self._times else None

    def newest(self) -> float | None:
        return self._times[-1] if self._times else None

    def clear(self) -> None:
        self._times.clear()


class RateLimiter:
    """At most ``limit`` accepted requests in any window of ``span`` seconds.

    For rate r >= 1 the window is 1 s and the limit floor(r); for r < 1 the
    window stretches to 1/r s holding one request, so e.g. 0.5 rps admits one
    request every two seconds.  Rejected requests do not use up capacity.
    """

    def __init__(self) -> None:
        self._rate = 0.0
        self._window = SlidingWindow()
        self._limit = 0

    def _configure(self, rate: float) -> None:
        if rate != self._rate:
            self._rate = rate
            span = 1.0 if rate >= 1 else 1.0 / rate
            self._limit = max(1, math.floor(rate * span + 1e-9))
            self._window = SlidingWindow(span)

    def check(self, rate: float, now: float) -> float | None:
        """Admit a request (None) or return seconds until a slot frees."""
        wait = self.wait(rate, now)
        if wait is None and rate > 0:
            self.admit(now)
        return wait

    def wait(self, rate: float, now: float) -> float | None:
        """None if a request at ``now`` would be admitted, else seconds until a slot frees;
        uses no capacity (``admit`` does), so two limits can be asked before either counts."""
        if rate <= 0:
            return None
        self._configure(rate)
        if self._window.count(now) < self._limit:
            return None
        return self._until_slot(now)

    def admit(self, now: float) -> None:
        self._window.add(now)

    def quota(self, rate: float, now: float) -> tuple[int, int, float]:
        """(limit, remaining, seconds until the window has no request of now left: the quota
        is whole again) for the ``RateLimit-*`` headers."""
        self._configure(rate)
        remaining = max(self._limit - self._window.count(now), 0)
        newest = self._window.newest()
        reset = 0.0 if newest is None else max(newest + self._window.span - now, 0.0)
        return self._limit, remaining, reset

    def _until_slot(self, now: float) -> float:
        oldest = self._window.oldest()
        assert oldest is not None  # only asked of a window that holds requests
        return max(oldest + self._window.span - now, 0.0)

    def reset(self) -> None:
        self._window.clear()


_RECENT = 5000  # arrival times kept for ``recent_arrivals``
_SECONDS = 3600  # one-second rows kept for ``per_second``
NO_KEY = "-"  # the key of requests without ``Authorization: Bearer <token>``


class PerSecond:
    """Counters per whole monotonic second, the last ``_SECONDS`` seconds that saw any."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.rows: dict[int, list[int]] = {}

    def row(self, now: float) -> list[int]:
        second = math.floor(now)
        row = self.rows.get(second)
        if row is None:
            row = self.rows[second] = [0] * self.width
            if len(self.rows) > _SECONDS:  # dicts keep insertion order: drop the oldest
                del self.rows[next(iter(self.rows))]
        return row

    def snapshot(self) -> list[list[int]]:
        return [[second, *row] for second, row in sorted(self.rows.items())]

    def clear(self) -> None:
        self.rows.clear()


class KeyStats:
    """One API key's requests, its 429s, its busiest one-second window (arrivals, 429s
    included, as the global ``max_rps_1s``) and its [second, arrived, 429s] series."""

    def __init__(self) -> None:
        self.requests = 0
        self.sent_429 = 0
        self.max_rps_1s = 0
        self._arrivals = SlidingWindow()
        self.seconds = PerSecond(2)

    def arrived(self, now: float) -> None:
        self.requests += 1
        self.max_rps_1s = max(self.max_rps_1s, self._arrivals.add(now))
        self.seconds.row(now)[0] += 1

    def refused(self, arrived_at: float) -> None:
        self.sent_429 += 1
        self.seconds.row(arrived_at)[1] += 1

    def snapshot(self) -> dict[str, object]:
        return {"requests": self.requests, "sent_429": self.sent_429,
                "max_rps_1s": self.max_rps_1s, "per_second": self.seconds.snapshot()}


class Stats:
    """Counters exposed by ``GET /_admin/stats``.

    In-flight counting: a request is in flight from its arrival until its
    response is handed to the server for sending (latency and stalls included).

    Retry-After windows: every 429 the vendor sends announces a window that
    ends at ``sent + Retry-After``; a request arriving before the latest such
    end is a violation, whoever sent it (the window is global, as a limit
    shared by all workers would be).  Times are ``time.monotonic()`` seconds.
    """

    def __init__(self) -> None:
        self.total = 0
        self.by_endpoint: Counter[str] = Counter()
        self.by_path: Counter[str] = Counter()
        self.status: Counter[int] = Counter()
        self.max_rps_1s = 0
        self._arrivals = SlidingWindow()
        # A gauge: never reset, or requests in flight at a reset would drive it negative.
        self.in_flight = 0
        self.max_in_flight = 0
        self.retry_after_violations = 0
        self.last_429_at: float | None = None
        self.retry_after_until: float | None = None
        self.recent: deque[float] = deque(maxlen=_RECENT)  # arrival times, for tests
        self.by_key: dict[str, KeyStats] = {}
        # per second of arrival: [arrived, served (any answer but a 429), 429s]
        self.seconds = PerSecond(3)

    def arrived(
        self, now: float, endpoint: str | None, path_key: str, key: str = NO_KEY
    ) -> None:
        """Count a non-admin request as it arrives (before any 429/latency)."""
        self.total += 1
        key_stats = self.by_key.get(key)
        if key_stats is None:
            key_stats = self.by_key[key] = KeyStats()
        key_stats.arrived(now)
        self.seconds.row(now)[0] += 1
        if endpoint is not None:
            self.by_endpoint[endpoint] += 1
        self.by_path[path_key] += 1
        self.recent.append(now)
        in_window = self._arrivals.add(now)
        if in_window > self.max_rps_1s:
            self.max_rps_1s = in_window
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
        until = self.retry_after_until
        if until is not None and now < until:
            self.retry_after_violations += 1

    def announced(self, sent_at: float, retry_after: float) -> None:
        """A 429 with ``Retry-After: retry_after`` (seconds) is sent at ``sent_at``."""
        self.last_429_at = sent_at
        until = sent_at + retry_after
        if self.retry_after_until is None or until > self.retry_after_until:
            self.retry_after_until = until

    def answered(self, status: int, arrived_at: float, key: str = NO_KEY) -> None:
        """The answer to a request that arrived at ``arrived_at`` (its second in the series)."""
        self.status[status] += 1
        row = self.seconds.row(arrived_at)
        if status == 429:
            row[2] += 1
            if key in self.by_key:
                self.by_key[key].refused(arrived_at)
        else:
            row[1] += 1

    def finished(self) -> None:
        """The request is no longer in flight (answered, or cancelled at shutdown)."""
        self.in_flight -= 1

    def reset(self) -> None:
        self.total = 0
        self.by_endpoint.clear()
        self.by_path.clear()
        self.status.clear()
        self.max_rps_1s = 0
        self._arrivals.clear()
        self.max_in_flight = self.in_flight  # 0 unless requests are in flight now
        self.retry_after_violations = 0
        self.last_429_at = None
        self.retry_after_until = None
        self.recent.clear()
        self.by_key.clear()
        self.seconds.clear()

    def snapshot(self, now: float) -> dict[str, object]:
        return {
            "total": self.total,
            "by_endpoint": {name: self.by_endpoint[name] for name in ENDPOINTS},
            "by_path": dict(self.by_path),
            "status": {str(code): n for code, n in sorted(self.status.items())},
            "sent_429": self.status[429],
            "sent_5xx": sum(n for code, n in self.status.items() if code >= 500),
            "max_rps_1s": self.max_rps_1s,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "retry_after_violations": self.retry_after_violations,
            "last_429_at": self.last_429_at,
            "retry_after_until": self.retry_after_until,
            "monotonic_now": now,
            "recent_arrivals": list(self.recent),
            "by_key": {key: stats.snapshot() for key, stats in sorted(self.by_key.items())},
            # [whole monotonic second, arrived, served, 429s], oldest first; a second in
            # which no request arrived has no row.
            "per_second": self.seconds.snapshot(),
        }
