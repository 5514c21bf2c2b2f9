"""Tests for demo_vendor: a real server subprocess, driven over HTTP with httpx."""

from __future__ import annotations

import asyncio
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from demo_vendor import fault_hit, fib, metric_value, report_rows, service_metric, stars
from demo_vendor.__main__ import main as vendor_main
from demo_vendor.app import SERVERS
from demo_vendor.stats import RateLimiter, Stats

ROOT = Path(__file__).resolve().parents[1]
DAY = "2026-01-01"
URL_LINE = re.compile(r"^demo vendor listening on (http://127\.0\.0\.1:\d+)$")


class Vendor:
    """A ``python -m demo_vendor serve`` subprocess and a client for it."""

    def __init__(self, *args: str, server: str = SERVERS[0]) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.server = server
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "demo_vendor", "serve"),
                *("--port", "0", "--server", server, *args),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        line = self.proc.stdout.readline() if ready else ""
        match = URL_LINE.match(line.rstrip("\n"))
        if match is None:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"no listening line, got {line!r}; stderr: {err}")
        self.url = match.group(1)
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def get(self, path: str, **kw: object) -> httpx.Response:
        return self.client.get(path, **kw)  # type: ignore[arg-type]

    def post(self, path: str, json: object = None) -> httpx.Response:
        return self.client.post(path, json=json)

    def stats(self) -> dict[str, Any]:
        return self.client.get("/_admin/stats").json()

    def configure(self, **knobs: object) -> dict[str, Any]:
        r = self.client.post("/_admin/config", json=knobs)
        assert r.status_code == 200, r.text
        return r.json()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def server() -> str:
    """The HTTP layer ``start`` uses: the default, unless a test is marked ``BOTH_SERVERS``."""
    return SERVERS[0]


# Tests of what the HTTP layer carries (query strings, bodies, headers, concurrency,
# shutdown) run on every server; tests of the vendor's data and knobs on the default one.
BOTH_SERVERS = pytest.mark.parametrize("server", SERVERS)


@pytest.fixture
def start(server: str) -> Iterator[Callable[..., Vendor]]:
    started: list[Vendor] = []

    def _start(*args: str) -> Vendor:
        vendor = Vendor(*args, server=server)
        started.append(vendor)
        return vendor

    yield _start
    codes = [v.stop() for v in started]
    assert codes == [0] * len(codes), "server must exit 0 on SIGTERM"


# -- data -------------------------------------------------------------------


def test_pure_helpers() -> None:
    assert [fib(n) for n in range(1, 8)] == [1, 1, 2, 3, 5, 8, 13]
    # The same value in every process and every run (a digest of the inputs, not hash()),
    # and each input changes it.
    assert metric_value(7, "acct-001", "svc-001", DAY) == 768.193
    assert [
        metric_value(8, "acct-001", "svc-001", DAY),
        metric_value(7, "acct-002", "svc-001", DAY),
        metric_value(7, "acct-001", "svc-002", DAY),
        metric_value(7, "acct-001", "svc-001", "2026-01-02"),
    ] == [64.05, 419.37, 735.11, 810.449]
    values = [metric_value(7, "acct-001", f"svc-{i:03d}", DAY) for i in range(1, 200)]
    assert all(0 <= v < 1000 and round(v, 3) == v for v in values)
    assert len(set(values)) > 150
    assert 0 <= stars(7, "octo", "cat") < 200_000
    with pytest.raises(ValueError):
        fib(0)


# -- endpoints ----------------------------------------------------------------


def test_accounts(start: Callable[..., Vendor]) -> None:
    v = start("--accounts", "12")
    accounts = v.get("/accounts").json()["accounts"]
    assert len(accounts) == 12
    assert accounts[0] == {"id": "acct-001", "name": "Account 1"}
    assert accounts[11] == {"id": "acct-012", "name": "Account 12"}


@BOTH_SERVERS
def test_pagination(start: Callable[..., Vendor]) -> None:
    v = start("--services", "45", "--page-size", "20", "--seed", "3")
    seen: list[str] = []
    pages = 0
    cursor: str | None = None
    while True:
        params = {"cursor": cursor} if cursor else {}
        r = v.get("/accounts/acct-002/services", params=params)
        assert r.status_code == 200
        body = r.json()
        pages += 1
        for svc in body["services"]:
            assert svc["metric"] == service_metric(
                3, "acct-002", svc["id"], ["requests", "cpu_seconds", "storage_gb"]
            )
            seen.append(svc["id"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert len(seen) == len(set(seen)) == 45
    assert seen == [f"svc-{i:03d}" for i in range(1, 46)]

    # explicit limit, and the cap at 100
    assert len(v.get("/accounts/acct-001/services", params={"limit": 7}).json()["services"]) == 7
    v.configure(services=150)
    body = v.get("/accounts/acct-001/services", params={"limit": 1000}).json()
    assert len(body["services"]) == 100 and body["next_cursor"] is not None

    for bad in ("!!!", "Zm9v", "b2Zmc2V0Oi0x"):  # junk, "foo", "offset:-1"
        r = v.get("/accounts/acct-001/services", params={"cursor": bad})
        assert r.status_code == 400 and r.json() == {"error": "bad cursor"}
    assert v.get("/accounts/acct-001/services", params={"limit": 0}).status_code == 400
    assert v.get("/accounts/acct-999/services").status_code == 404
    assert v.get("/accounts/acct-1/services").status_code == 404  # non-canonical id


def test_metrics_values_and_determinism(start: Callable[..., Vendor]) -> None:
    a = start("--seed", "11", "--accounts", "2", "--services", "4", "--metrics", "x,y")
    b = start("--seed", "11", "--accounts", "2", "--services", "4", "--metrics", "x,y")
    other = start("--seed", "12", "--accounts", "2", "--services", "4", "--metrics", "x,y")
    differs = False
    for acct in ("acct-001", "acct-002"):
        for svc in ("svc-001", "svc-002", "svc-003", "svc-004"):
            for day in ("2026-01-01", "2026-02-28"):
                path = f"/accounts/{acct}/services/{svc}/metrics"
                body = a.get(path, params={"day": day}).json()
                assert body == {
                    "account": acct,
                    "service": svc,
                    "metric": service_metric(11, acct, svc, ["x", "y"]),
                    "day": day,
                    "value": metric_value(11, acct, svc, day),
                }
                assert b.get(path, params={"day": day}).json() == body
                differs |= other.get(path, params={"day": day}).json() != body
    assert differs
    path = "/accounts/acct-001/services/svc-001/metrics"
    assert a.get(path).status_code == 400
    assert a.get(path, params={"day": "2026-13-01"}).status_code == 400
    assert a.get(path, params={"day": "yesterday"}).json()["error"].startswith("bad day")
    for unknown in ("acct-001/services/svc-005", "acct-003/services/svc-001"):
        assert a.get(f"/accounts/{unknown}/metrics", params={"day": DAY}).status_code == 404
    stats = a.stats()
    assert stats["by_path"][f"{path}?day=2026-01-01"] == 1
    assert stats["by_endpoint"]["metrics"] == 16 + 5


@BOTH_SERVERS
def test_fib_and_repos(start: Callable[..., Vendor]) -> None:
    v = start()
    for n, want in ((11, 89), (12, 144), (16, 987), (17, 1597)):
        assert v.get(f"/fib/{n}").json() == {"n": n, "value": want}
        assert v.post("/fib", {"nth": n}).json() == {"n": n, "value": want}
    assert v.get("/fib/0").status_code == 400
    assert v.get("/fib/abc").status_code == 400
    assert v.post("/fib", {"nth": "x"}).status_code == 400
    assert v.client.post("/fib", content=b"not json").status_code == 400
    assert v.get("/repos/octo/cat").json() == {
        "full_name": "octo/cat",
        "stargazers_count": stars(7, "octo", "cat"),
    }
    r = v.get("/no/such/route")
    assert r.status_code == 404 and r.json() == {"error": "not found"}
    assert r.headers["content-type"] == "application/json"
    stats = v.stats()
    assert stats["by_endpoint"]["fib"] == 12
    assert stats["by_path"]["/fib"] == 6
    assert stats["by_path"]["/fib/11"] == 1


@BOTH_SERVERS
def test_reports(start: Callable[..., Vendor]) -> None:
    v = start("--report-polls", "3", "--services", "6", "--seed", "5")
    r = v.post("/reports", {"account": "acct-002", "day": DAY})
    assert r.status_code == 202
    rid = r.json()["report_id"]
    assert r.json() == {"report_id": rid, "status": "pending"}
    assert v.post("/reports", {"account": "acct-002", "day": DAY}).json()["report_id"] == rid
    for _ in range(3):
        assert v.get(f"/reports/{rid}").json() == {"report_id": rid, "status": "pending"}
    ready = v.get(f"/reports/{rid}").json()
    assert ready == {
        "report_id": rid,
        "status": "ready",
        "account": "acct-002",
        "day": DAY,
        "rows": report_rows(5, "acct-002", DAY, 6, ["requests", "cpu_seconds", "storage_gb"]),
    }
    assert [row["service"] for row in ready["rows"]] == [f"svc-{i:03d}" for i in range(1, 7)]
    assert v.get(f"/reports/{rid}").json()["status"] == "ready"  # stays ready
    assert v.get("/reports/rpt-nope").status_code == 404
    assert v.post("/reports", {"account": "acct-009", "day": DAY}).status_code == 404
    assert v.post("/reports", {"account": "acct-001", "day": "01/01/2026"}).status_code == 400
    assert v.post("/reports", [1, 2]).status_code == 400
    assert v.stats()["by_endpoint"]["reports_poll"] == 6
    # reset clears poll counters: the report is pending again
    v.post("/_admin/reset")
    assert v.get(f"/reports/{rid}").json()["status"] == "pending"


# -- fault injection ------------------------------------------------------------


def test_fail_paths(start: Callable[..., Vendor]) -> None:
    v = start()
    assert v.configure(fail_paths={"/fib/5": 1})["fail_paths"] == {"/fib/5": 1}
    first = v.get("/fib/5")
    assert first.status_code == 500 and first.json() == {"error": "injected failure"}
    assert v.get("/fib/5").json() == {"n": 5, "value": 5}
    stats = v.stats()
    assert stats["by_path"]["/fib/5"] == 2
    assert stats["status"] == {"200": 1, "500": 1}
    assert stats["sent_5xx"] == 1
    assert v.get("/_admin/config").json()["fail_paths"] == {"/fib/5": 0}


def _fib_round(v: Vendor, n: int = 40) -> set[str]:
    failed = set()
    for i in range(1, n + 1):
        r = v.get(f"/fib/{i}")
        assert r.status_code in (200, 500)
        if r.status_code == 500:
            failed.add(f"/fib/{i}")
    return failed


def test_error_rate_permanent(start: Callable[..., Vendor]) -> None:
    v = start("--error-rate", "0.5", "--error-times", "0", "--seed", "9")
    expected = {f"/fib/{i}" for i in range(1, 41) if fault_hit(9, "err", f"/fib/{i}", 0.5)}
    assert 0 < len(expected) < 40
    assert _fib_round(v) == expected
    assert _fib_round(v) == expected  # permanent: same paths fail again
    assert v.stats()["sent_5xx"] == 2 * len(expected)


def test_error_rate_transient(start: Callable[..., Vendor]) -> None:
    v = start("--error-rate", "0.5", "--error-times", "1", "--seed", "9")
    expected = {f"/fib/{i}" for i in range(1, 41) if fault_hit(9, "err", f"/fib/{i}", 0.5)}
    assert _fib_round(v) == expected
    assert _fib_round(v) == set()  # transient: each faulty path failed once
    v.post("/_admin/reset")  # reset re-arms the transient faults
    assert _fib_round(v) == expected


@BOTH_SERVERS
def test_latency_and_stall(start: Callable[..., Vendor]) -> None:
    v = start("--latency-ms", "150")
    t0 = time.monotonic()
    assert v.get("/fib/3").status_code == 200
    assert time.monotonic() - t0 >= 0.15
    v.configure(latency_ms=0, stall_rate=1.0, stall_ms=60_000)
    with pytest.raises(httpx.ReadTimeout):
        v.client.get("/fib/4", timeout=0.3)
    # Admin is never stalled; the stalled request was counted on arrival.
    assert v.stats()["by_path"]["/fib/4"] == 1
    # SIGTERM (in the fixture) must still exit 0 with a stalled connection open.


def test_not_found_paths(start: Callable[..., Vendor]) -> None:
    v = start()
    metric = "/accounts/acct-001/services/svc-001/metrics"
    cfg = v.configure(not_found_paths=["/fib/5", f"{metric}?day={DAY}"], fail_paths={"/fib/5": 1})
    assert cfg["not_found_paths"] == ["/fib/5", f"{metric}?day={DAY}"]
    for _ in range(3):  # permanent while listed
        r = v.get("/fib/5")
        assert r.status_code == 404 and r.json() == {"error": "not found"}
    assert v.get(metric, params={"day": DAY}).status_code == 404
    assert v.get(metric, params={"day": "2026-01-02"}).status_code == 200  # keys are per day
    assert v.get("/fib/6").json() == {"n": 6, "value": 8}
    # The 404 comes before the injected 500: the armed fail_paths entry is untouched.
    assert v.get("/_admin/config").json()["fail_paths"] == {"/fib/5": 1}
    v.configure(not_found_paths=[])  # "fix the vendor"
    assert v.get("/fib/5").status_code == 500
    assert v.get("/fib/5").json() == {"n": 5, "value": 5}
    assert v.get(metric, params={"day": DAY}).status_code == 200
    stats = v.stats()
    assert stats["status"] == {"200": 4, "404": 4, "500": 1}
    assert stats["by_path"]["/fib/5"] == 5
    assert stats["by_path"][f"{metric}?day={DAY}"] == 2


@BOTH_SERVERS
def test_stall_paths_and_in_flight(start: Callable[..., Vendor]) -> None:
    v = start()
    metric = "/accounts/acct-001/services/svc-001/metrics"
    v.configure(stall_paths=["/fib/4", f"{metric}?day={DAY}"], stall_ms=60_000, stall_rate=0)
    with pytest.raises(httpx.ReadTimeout):
        v.client.get("/fib/4", timeout=0.5)
    with pytest.raises(httpx.ReadTimeout):
        v.client.get(metric, params={"day": DAY}, timeout=0.5)
    assert v.get("/fib/5").json() == {"n": 5, "value": 5}  # other keys are not stalled
    assert v.get(metric, params={"day": "2026-01-02"}).status_code == 200
    stats = v.stats()
    # The two stalled requests are still being handled (the client gave up, not the server);
    # each later request overlapped them.
    assert stats["in_flight"] == 2 and stats["max_in_flight"] == 3
    assert stats["status"] == {"200": 2} and stats["total"] == 4
    # reset keeps the gauge and restarts the maximum from it
    v.post("/_admin/reset")
    stats = v.stats()
    assert (stats["in_flight"], stats["max_in_flight"], stats["total"]) == (2, 2, 0)
    # SIGTERM (in the fixture) must still exit 0 with two stalled requests.


@BOTH_SERVERS
def test_max_in_flight(start: Callable[..., Vendor]) -> None:
    v = start()
    for i in range(1, 6):
        assert v.get(f"/fib/{i}").status_code == 200
        assert v.stats()["in_flight"] == 0  # admin requests are never counted
    assert v.stats()["max_in_flight"] == 1
    n = 8
    clients = [httpx.Client(base_url=v.url, timeout=30) for _ in range(n)]
    try:
        for client in clients:  # open every connection before the concurrent round
            assert client.get("/fib/3").status_code == 200
        v.post("/_admin/reset")
        # 2 s of latency: all n requests, sent at once over open connections, overlap.
        v.configure(latency_ms=2000)
        with ThreadPoolExecutor(n) as pool:
            codes = list(pool.map(lambda c: c.get("/fib/7").status_code, clients))
    finally:
        for client in clients:
            client.close()
    assert codes == [200] * n
    stats = v.stats()
    assert (stats["max_in_flight"], stats["in_flight"], stats["total"]) == (n, 0, n)


@BOTH_SERVERS
def test_burst_429(start: Callable[..., Vendor]) -> None:
    # A rate limit of one request per 5 s: the burst comes first and uses none of it.
    v = start("--rate-limit-rps", "0.2")
    cfg = v.configure(burst_429={"count": 3, "retry_after_s": 30})
    assert cfg["burst_429"] == {"count": 3, "retry_after_s": 30.0}
    limited = [v.get(f"/fib/{i}") for i in (1, 2, 3)]
    assert [r.status_code for r in limited] == [429, 429, 429]
    assert [r.headers["retry-after"] for r in limited] == ["30", "30", "30"]
    assert all(r.json() == {"error": "rate limited"} for r in limited)
    assert v.get("/_admin/config").json()["burst_429"] == {"count": 0, "retry_after_s": 30.0}
    assert v.get("/fib/4").status_code == 200  # the burst is over; the rate limit admits one
    after = v.get("/fib/5")
    assert after.status_code == 429 and 4 < float(after.headers["retry-after"]) <= 5
    v.configure(rate_limit_rps=0)
    assert [v.get("/fib/6").status_code for _ in range(3)] == [200, 200, 200]
    stats = v.stats()
    assert stats["status"] == {"200": 4, "429": 4} and stats["sent_429"] == 4
    # Setting the knob again starts another burst; decimals are sent as configured,
    # whole seconds rounded up with retry_after_integer.
    v.configure(burst_429={"count": 2, "retry_after_s": 1.5})
    assert [v.get("/fib/7").headers.get("retry-after") for _ in range(3)] == ["1.5", "1.5", None]
    v.configure(burst_429={"count": 1, "retry_after_s": 1.5}, retry_after_integer=True)
    assert [v.get("/fib/8").headers.get("retry-after") for _ in range(2)] == ["2", None]
    assert v.stats()["sent_429"] == 7


def test_retry_after_violations_burst(start: Callable[..., Vendor]) -> None:
    v = start()
    v.configure(burst_429={"count": 2, "retry_after_s": 2})
    assert v.get("/fib/1").status_code == 429  # opens a 2 s window; not itself a violation
    assert v.get("/fib/2").status_code == 429  # inside the window: violation 1
    assert v.get("/fib/3").status_code == 200  # inside the window: violation 2, though a 200
    stats = v.stats()
    assert stats["retry_after_violations"] == 2
    assert stats["retry_after_until"] == pytest.approx(stats["last_429_at"] + 2)
    assert stats["last_429_at"] <= stats["monotonic_now"]
    # Wait out the window as announced (measured from after the last 429 arrived here).
    time.sleep(max(0.0, stats["retry_after_until"] - stats["monotonic_now"]) + 0.1)
    assert v.get("/fib/4").status_code == 200
    assert v.stats()["retry_after_violations"] == 2
    v.post("/_admin/reset")
    stats = v.stats()
    assert stats["retry_after_violations"] == 0
    assert stats["last_429_at"] is None and stats["retry_after_until"] is None


def test_retry_after_violations_rate_limit(start: Callable[..., Vendor]) -> None:
    v = start("--rate-limit-rps", "0.2")  # one request per 5 s
    assert v.get("/fib/1").status_code == 200
    first = v.get("/fib/1")
    assert first.status_code == 429 and 4 < float(first.headers["retry-after"]) <= 5
    second = v.get("/fib/1")  # violation 1
    assert second.status_code == 429
    v.configure(rate_limit_rps=0)
    # Lifting the limit does not close a window the vendor already announced.
    assert v.get("/fib/1").status_code == 200  # violation 2
    stats = v.stats()
    assert stats["retry_after_violations"] == 2
    assert stats["status"] == {"200": 2, "429": 2}
    # Both 429s announced (almost) the same end: the later one, give or take the rounding.
    end = stats["last_429_at"] + float(second.headers["retry-after"])
    assert stats["retry_after_until"] == pytest.approx(end, abs=0.02)
    v.post("/_admin/reset")  # reset closes the window
    assert v.get("/fib/1").status_code == 200
    assert v.stats()["retry_after_violations"] == 0


def test_fault_flags(start: Callable[..., Vendor]) -> None:
    v = start(
        "--burst-429", "2", "--burst-retry-after", "0.5",
        "--not-found-path", "/fib/3", "--not-found-path", "/repos/a/b",
        "--stall-path", "/fib/9",
    )  # fmt: skip
    cfg = v.get("/_admin/config").json()
    assert cfg["burst_429"] == {"count": 2, "retry_after_s": 0.5}
    assert cfg["not_found_paths"] == ["/fib/3", "/repos/a/b"]
    assert cfg["stall_paths"] == ["/fib/9"]
    assert [v.get("/fib/2").headers.get("retry-after") for _ in range(3)] == ["0.5", "0.5", None]
    assert v.get("/fib/3").status_code == 404
    assert v.get("/repos/a/b").status_code == 404


# -- rate limiting ----------------------------------------------------------------


def accepted_by_window(arrivals: list[float], limit: int, span_s: float = 1.0) -> list[bool]:
    """The test's own model of the vendor's limiter: an arrival is accepted when fewer than
    ``limit`` accepted arrivals are less than ``span_s`` older; a refused one takes nothing."""
    accepted: list[float] = []
    verdicts = []
    for t in arrivals:
        ok = sum(1 for a in accepted if t - a < span_s) < limit
        if ok:
            accepted.append(t)
        verdicts.append(ok)
    return verdicts


def most_in_window(arrivals: list[float], span_s: float = 1.0) -> int:
    return max((sum(1 for a in arrivals[:i + 1] if t - a < span_s)
                for i, t in enumerate(arrivals)), default=0)


def test_the_limiter_and_the_arrival_window_on_given_times() -> None:
    """The vendor's limiter and its one-second arrival window with the times given, so the
    exact counts do not depend on how fast requests get through (see the HTTP tests below)."""
    limiter = RateLimiter()
    assert [limiter.check(5, t / 10) for t in range(5)] == [None] * 5
    assert limiter.check(5, 0.5) == pytest.approx(0.5)  # until the one at 0.0 leaves
    assert limiter.check(5, 0.99) == pytest.approx(0.01)
    assert limiter.check(5, 1.0) is None  # the window slid past 0.0
    assert limiter.check(5, 1.05) == pytest.approx(0.05)
    burst = [limiter.check(50, 10 + i / 400) for i in range(200)]  # 200 in half a second
    assert burst.count(None) == 50 and burst[:50] == [None] * 50
    assert limiter.check(50, 11.0) is None  # the first of the burst has left the window
    slow = RateLimiter()  # below 1 rps the window stretches: 0.5 rps = one per 2 s
    assert [slow.check(0.5, t) for t in (0.0, 1.0, 1.99, 2.0)] == [None, 1.0, pytest.approx(0.01),
                                                                   None]
    limiter.reset()
    assert limiter.check(5, 11.5) is None

    stats = Stats()
    for i in range(10):  # ten in 0.9 s, then ten 0.2 s apart
        stats.arrived(i / 10, "accounts", "/accounts")
    for i in range(10):
        stats.arrived(5 + i / 5, "accounts", "/accounts")
    assert (stats.max_rps_1s, stats.total) == (10, 20)
    stats.reset()
    for i in range(8):
        stats.arrived(20 + i / 8, "fib", "/fib/2")  # 1 s apart from first to ninth: not one window
    stats.arrived(21.0, "fib", "/fib/2")
    assert stats.max_rps_1s == 8


def test_rate_limit_sequential(start: Callable[..., Vendor]) -> None:
    v = start("--rate-limit-rps", "5")

    def until_refused() -> httpx.Response:
        """Requests one after the other until one is refused (five a second are allowed)."""
        for _ in range(200):
            r = v.get("/fib/2")
            if r.status_code == 429:
                return r
            assert r.status_code == 200
        raise AssertionError("200 requests one after the other, none refused at 5 rps")

    r = until_refused()
    assert r.json() == {"error": "rate limited"}
    retry_after = float(r.headers["retry-after"])
    assert 0 < retry_after <= 1
    assert re.fullmatch(r"\d+\.\d\d", r.headers["retry-after"])
    v.configure(retry_after_integer=True)
    assert until_refused().headers["retry-after"] == "1"
    time.sleep(1.05)  # the window slides past every request so far, however slow they were
    assert v.get("/fib/2").status_code == 200
    stats = v.stats()
    # Each answer is what the window says of the arrival times the vendor recorded.
    arrivals = stats["recent_arrivals"]
    verdicts = accepted_by_window(arrivals, 5)
    assert stats["status"] == {"200": verdicts.count(True), "429": verdicts.count(False)}
    assert stats["sent_429"] == 2 and stats["total"] == len(arrivals)
    assert verdicts[:5] == [True] * 5 and verdicts[-1]
    # admin is never rate limited
    assert all(v.get("/_admin/stats").status_code == 200 for _ in range(20))


def test_key_stats_and_per_second_on_given_times() -> None:
    """Per API key: requests, 429s and the busiest one-second window, mirroring the global
    one; the per-second series counts arrivals, answers other than 429 and 429s by the
    whole second each request arrived in."""
    stats = Stats()
    # tok-a: ten in 0.9 s, the last three refused; tok-b: ten 0.2 s apart; in time order
    events = sorted([(100 + i / 10, "tok-a", 200 if i < 7 else 429) for i in range(10)]
                    + [(100 + i / 5, "tok-b", 200) for i in range(10)])
    for at, token, status in events:
        stats.arrived(at, "fib", "/fib/1", token)
        stats.answered(status, at, token)
    stats.arrived(102.5, "fib", "/fib/1")  # no token: key "-"
    stats.answered(404, 102.5)
    snapshot = stats.snapshot(103.0)
    assert snapshot["by_key"] == {
        "-": {"requests": 1, "sent_429": 0, "max_rps_1s": 1, "per_second": [[102, 1, 0]]},
        "tok-a": {"requests": 10, "sent_429": 3, "max_rps_1s": 10, "per_second": [[100, 10, 3]]},
        "tok-b": {"requests": 10, "sent_429": 0, "max_rps_1s": 5,
                  "per_second": [[100, 5, 0], [101, 5, 0]]},
    }
    # the global window saw tok-a's ten and tok-b's five of [100, 101) together
    assert (snapshot["total"], snapshot["max_rps_1s"], snapshot["sent_429"]) == (21, 15, 3)
    assert snapshot["per_second"] == [[100, 15, 12, 3], [101, 5, 5, 0], [102, 1, 1, 0]]
    stats.reset()
    assert stats.snapshot(104.0)["by_key"] == {} and stats.snapshot(104.0)["per_second"] == []


def test_key_rate_limit(start: Callable[..., Vendor]) -> None:
    # One request per 5 s for each API key; the global limit is off.
    v = start("--key-rate-limit-rps", "0.2")

    def get(token: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return v.get("/fib/3", headers=headers)

    codes = [get(token).status_code for token in ("tok-a", "tok-a", "tok-b", None, "tok-b")]
    assert codes == [200, 429, 200, 200, 429]
    refused = get("tok-a")
    assert refused.status_code == 429 and 4 < float(refused.headers["retry-after"]) <= 5
    # Unannounced: nothing about the limit on any answer but the 429's Retry-After.
    told = [name for name in refused.headers if "ratelimit" in name.lower()]
    assert told == []
    # Not a bearer token, or an empty one: the key "-", whose one request is spent.
    assert v.get("/fib/3", headers={"Authorization": "Basic dTpw"}).status_code == 429
    assert v.get("/fib/3", headers={"Authorization": "Bearer"}).status_code == 429
    assert v.get("/fib/3", headers={"Authorization": "bearer tok-c"}).status_code == 200
    by_key = v.stats()["by_key"]
    assert {key: (s["requests"], s["sent_429"]) for key, s in by_key.items()} == {
        "-": (3, 2), "tok-a": (3, 2), "tok-b": (2, 1), "tok-c": (1, 0),
    }
    assert by_key["tok-c"]["max_rps_1s"] == 1
    assert all(1 <= s["max_rps_1s"] <= s["requests"] for s in by_key.values())
    # Changed at runtime; with the global limit on too, a request must pass both.
    v.configure(key_rate_limit_rps=2, rate_limit_rps=0.2)
    assert get("tok-d").status_code == 200
    assert get("tok-e").status_code == 429  # global: one per 5 s
    v.configure(rate_limit_rps=0, key_rate_limit_rps=0)
    assert [get("tok-a").status_code for _ in range(5)] == [200] * 5
    stats = v.stats()
    assert stats["sent_429"] == sum(s["sent_429"] for s in stats["by_key"].values()) == 6
    tok_e = stats["by_key"]["tok-e"]
    assert (tok_e["requests"], tok_e["sent_429"], tok_e["max_rps_1s"]) == (1, 1, 1)
    assert [row[1:] for row in tok_e["per_second"]] == [[1, 1]]
    # The per-second series adds up to the totals.
    rows = stats["per_second"]
    assert [row[0] for row in rows] == sorted({row[0] for row in rows})
    assert sum(row[1] for row in rows) == stats["total"] == 16
    assert (sum(row[2] for row in rows), sum(row[3] for row in rows)) == (10, 6)


@BOTH_SERVERS
def test_key_rate_limit_burst(start: Callable[..., Vendor]) -> None:
    """30 requests at once on each of 3 tokens against 10 per second per token: each
    token's first 10 always pass, and the vendor counts each token's 429s exactly."""
    v = start("--key-rate-limit-rps", "10")
    tokens = ("tok-acct-001", "tok-acct-002", "tok-acct-003")

    async def burst() -> list[tuple[str, httpx.Response]]:
        limits = httpx.Limits(max_connections=90, max_keepalive_connections=90)
        async with httpx.AsyncClient(base_url=v.url, limits=limits, timeout=10) as client:
            async def one(token: str) -> tuple[str, httpx.Response]:
                return token, await client.get("/fib/5", headers={"Authorization":
                                                                   f"Bearer {token}"})
            return list(await asyncio.gather(*(one(t) for t in tokens for _ in range(30))))

    answers = asyncio.run(burst())
    by_key = v.stats()["by_key"]
    assert set(by_key) == set(tokens)
    for token in tokens:
        codes = [r.status_code for t, r in answers if t == token]
        assert len(codes) == 30 and set(codes) <= {200, 429}
        assert codes.count(200) >= 10
        assert by_key[token]["requests"] == 30
        assert by_key[token]["sent_429"] == codes.count(429)


def test_rate_limit_headers(start: Callable[..., Vendor]) -> None:
    # Global: one request per 100 s; per key: 3 a second. The headers tell the tighter one.
    v = start("--rate-limit-rps", "0.01", "--key-rate-limit-rps", "3", "--rate-limit-headers")
    names = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset",
             "x-ratelimit-remaining", "x-ratelimit-reset")

    def quota(r: httpx.Response) -> dict[str, str]:
        return {name: r.headers[name] for name in names if name in r.headers}

    first = v.get("/fib/1")
    assert first.status_code == 200
    told = quota(first)
    assert (told["ratelimit-limit"], told["ratelimit-remaining"]) == ("1", "0")
    assert 90 < int(told["ratelimit-reset"]) <= 100  # the window is 100 s long
    assert told["x-ratelimit-remaining"] == "0"
    assert told["x-ratelimit-reset"] == told["ratelimit-reset"]
    refused = v.get("/fib/1")
    assert refused.status_code == 429 and "retry-after" in refused.headers
    assert quota(refused)["ratelimit-remaining"] == "0"
    # The global limit off: the key's. A fresh token has 3 a second, this one used.
    v.configure(rate_limit_rps=0)
    fresh = v.get("/fib/1", headers={"Authorization": "Bearer tok-b"})
    assert quota(fresh) == {"ratelimit-limit": "3", "ratelimit-remaining": "2",
                            "ratelimit-reset": "1", "x-ratelimit-remaining": "2",
                            "x-ratelimit-reset": "1"}
    # Headers on, but no limit in force; then a limit, but headers off: nothing is told.
    v.configure(key_rate_limit_rps=0)
    assert quota(v.get("/fib/1")) == {}
    v.configure(key_rate_limit_rps=3, rate_limit_headers=False)
    assert quota(v.get("/fib/1", headers={"Authorization": "Bearer tok-c"})) == {}
    # Errors carry them as well: a 404 passed the limits and used a request.
    v.configure(rate_limit_headers=True)
    missing = v.get("/nope", headers={"Authorization": "Bearer tok-d"})
    assert missing.status_code == 404 and quota(missing)["ratelimit-remaining"] == "2"


def test_account_tokens_and_key_burst(start: Callable[..., Vendor]) -> None:
    v = start("--accounts", "2", "--account-tokens", "--burst-429", "2",
              "--burst-retry-after", "3", "--burst-key", "tok-acct-002")
    assert v.get("/accounts").json()["accounts"] == [
        {"id": "acct-001", "name": "Account 1", "token": "tok-acct-001"},
        {"id": "acct-002", "name": "Account 2", "token": "tok-acct-002"},
    ]
    cfg = v.get("/_admin/config").json()
    assert cfg["account_tokens"] is True
    assert cfg["burst_429"] == {"count": 2, "retry_after_s": 3.0, "key": "tok-acct-002"}

    def get(token: str) -> httpx.Response:
        return v.get("/fib/2", headers={"Authorization": f"Bearer {token}"})

    # Only that key's requests are refused; the other key passes between them.
    codes = [get(t).status_code for t in ("tok-acct-001", "tok-acct-002", "tok-acct-001",
                                          "tok-acct-002", "tok-acct-002")]
    assert codes == [200, 429, 200, 429, 200]
    assert v.get("/_admin/config").json()["burst_429"]["count"] == 0
    assert {k: s["sent_429"] for k, s in v.stats()["by_key"].items()} == {
        "-": 0, "tok-acct-001": 0, "tok-acct-002": 2,
    }
    # Setting the knob without a key: any request again.
    v.configure(burst_429={"count": 1, "retry_after_s": 1}, account_tokens=False)
    assert get("tok-acct-001").status_code == 429
    assert v.get("/_admin/config").json()["burst_429"] == {"count": 0, "retry_after_s": 1.0}
    assert "token" not in v.get("/accounts").json()["accounts"][0]


@BOTH_SERVERS
def test_rate_limit_burst(start: Callable[..., Vendor]) -> None:
    v = start("--rate-limit-rps", "50")

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=v.url, limits=limits, timeout=10) as client:
            return list(await asyncio.gather(*(client.get(f"/fib/{i}") for i in range(1, 201))))

    responses = asyncio.run(burst())
    ok = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(limited) == 200
    stats = v.stats()
    # The limiter is an exact sliding window: exactly the arrivals it admits are accepted, at
    # most 50 in any 1 s window and the first 50 always, however the 200 were spread.
    arrivals = stats["recent_arrivals"]
    assert len(arrivals) == stats["total"] == 200
    verdicts = accepted_by_window(arrivals, 50)
    assert (len(ok), len(limited)) == (verdicts.count(True), verdicts.count(False))
    assert verdicts[:50] == [True] * 50
    assert all(0 < float(r.headers["retry-after"]) <= 1 for r in limited)
    assert stats["sent_429"] == len(limited)
    assert stats["status"] == {"200": len(ok), **({"429": len(limited)} if limited else {})}
    # max_rps_1s counts every arrival, 429s included.
    assert stats["max_rps_1s"] == most_in_window(arrivals)


def test_max_rps_sliding_window(start: Callable[..., Vendor]) -> None:
    v = start()
    for _ in range(10):
        v.get("/accounts")
    for _ in range(5):
        v.get("/_admin/stats")
    stats = v.stats()
    # The most arrivals in any one second of those the vendor recorded: 10 when they came
    # within a second (the arithmetic on given times is tested above); admin not counted.
    assert stats["total"] == 10 == len(stats["recent_arrivals"])
    assert stats["max_rps_1s"] == most_in_window(stats["recent_arrivals"])


# -- admin ------------------------------------------------------------------------


def test_admin_reset_and_config(start: Callable[..., Vendor]) -> None:
    v = start()
    v.get("/accounts")
    v.get("/fib/3")
    v.get("/nope")
    before_reset = v.stats()
    assert before_reset["total"] == 3
    # Arrival times, oldest first, on the same clock as monotonic_now.
    arrivals = before_reset["recent_arrivals"]
    assert len(arrivals) == 3 and arrivals == sorted(arrivals)
    assert arrivals[-1] <= before_reset["monotonic_now"]
    assert v.post("/_admin/reset").json() == {"ok": True}
    stats = v.stats()
    assert isinstance(stats.pop("monotonic_now"), float)
    assert stats == {
        "total": 0,
        "by_endpoint": {
            "accounts": 0,
            "services": 0,
            "metrics": 0,
            "reports_create": 0,
            "reports_poll": 0,
            "fib": 0,
            "repos": 0,
        },
        "by_path": {},
        "status": {},
        "sent_429": 0,
        "sent_5xx": 0,
        "max_rps_1s": 0,
        "in_flight": 0,
        "max_in_flight": 0,
        "retry_after_violations": 0,
        "last_429_at": None,
        "retry_after_until": None,
        "recent_arrivals": [],
        "by_key": {},
        "per_second": [],
    }
    before = v.get("/_admin/config").json()
    bad_updates: list[dict[str, object]] = [
        {"error_rate": 2},
        {"accounts": -1},
        {"page_size": 0},
        {"latency_ms": "fast"},
        {"no_such_knob": 1},
        {"fail_paths": {"/fib/1": -1}},
        {"metrics": []},
        {"not_found_paths": "/fib/1"},
        {"not_found_paths": ["fib/1"]},
        {"stall_paths": [1]},
        {"burst_429": 3},
        {"burst_429": {"retry_after_s": 1}},
        {"burst_429": {"count": -1}},
        {"burst_429": {"count": 1, "retry_after_s": -1}},
        {"burst_429": {"count": 1, "seconds": 1}},
        {"burst_429": {"count": 1, "key": ""}},
        {"burst_429": {"count": 1, "key": 7}},
        {"key_rate_limit_rps": -1},
        {"rate_limit_headers": 1},
        {"account_tokens": "yes"},
        {"services": 10, "error_rate": 1.5},  # all-or-nothing
    ]
    for bad in bad_updates:
        r = v.post("/_admin/config", bad)
        assert r.status_code == 400, bad
        assert isinstance(r.json()["error"], str)
    assert v.client.post("/_admin/config", content=b"[").status_code == 400
    assert v.get("/_admin/config").json() == before
    after = v.configure(accounts=5, metrics=["a"], seed=1)
    assert (after["accounts"], after["metrics"], after["seed"]) == (5, ["a"], 1)
    assert len(v.get("/accounts").json()["accounts"]) == 5


# -- HTTP/1.1 wire behaviour ---------------------------------------------------------


def _read_response(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes, bytes]:
    """Read one response -> (head, body, leftover bytes)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-response"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while len(rest) < length:
        rest += sock.recv(65536)
    return head, rest[:length], rest[length:]


@BOTH_SERVERS
def test_keep_alive_pipelining_and_close(start: Callable[..., Vendor]) -> None:
    v = start()
    host, port = v.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        body = b'{"nth": 7}'
        sock.sendall(
            b"GET /fib/6 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /fib HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        head, payload, rest = _read_response(sock, b"")
        assert head.startswith(b"HTTP/1.1 200 OK") and payload == b'{"n":6,"value":8}'
        assert b"Content-Type: application/json" in head
        head, payload, rest = _read_response(sock, rest)
        assert payload == b'{"n":7,"value":13}' and b"Connection: close" not in head
        sock.sendall(b"GET /fib/8 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head, payload, rest = _read_response(sock, rest)
        assert payload == b'{"n":8,"value":21}' and b"Connection: close" in head
        assert rest == b"" and sock.recv(1) == b""  # server closed the connection
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"garbage\r\n\r\n")
        head, payload, _ = _read_response(sock, b"")
        assert re.match(rb"HTTP/1\.[01] 400 ", head)
        if v.server == "builtin":  # aiohttp answers a malformed request in text/plain
            assert head.startswith(b"HTTP/1.1 400") and b'"error"' in payload


@BOTH_SERVERS
def test_ready_file_and_sigint(tmp_path: Path, server: str) -> None:
    ready = tmp_path / "ready.txt"
    v = Vendor("--ready-file", str(ready), server=server)
    try:
        assert ready.read_text() == v.url
        assert v.get("/accounts").status_code == 200
    finally:
        assert v.stop(signal.SIGINT) == 0


# -- CLI errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--error-rate", "2"],
        ["--accounts", "-1"],
        ["--stall-rate", "nan"],
        ["--port", "abc"],
        ["--no-such-option"],
        ["--metrics", ","],
        ["--key-rate-limit-rps", "-1"],
        ["--burst-429", "1", "--burst-key", ""],
    ],
)
def test_cli_bad_input(args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "demo_vendor", "serve", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("demo_vendor: error: ")
    assert "Traceback" not in proc.stderr


def test_main_returns_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert vendor_main(["serve", "--error-rate", "-0.1"]) == 2
    assert vendor_main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "Traceback" not in err


def test_fanout_calls_carry_their_token(start: Callable[..., Vendor]) -> None:
    """What the per-key benchmark relies on: fanout's HTTP client (sync and async) sends a
    call's own headers, and the vendor counts the call under its bearer token."""
    from workers.http import VendorHTTPError, request_json, request_json_async

    v = start("--key-rate-limit-rps", "0.2")
    auth = {"Authorization": "Bearer tok-acct-001"}
    assert request_json("GET", f"{v.url}/fib/4", headers=auth, retries=0)["value"] == 3
    with pytest.raises(VendorHTTPError) as refused:
        asyncio.run(request_json_async("GET", f"{v.url}/fib/4", headers=auth, retries=0))
    assert refused.value.status == 429
    # Without the header: the key "-", which has its own allowance.
    assert asyncio.run(request_json_async("GET", f"{v.url}/fib/5", retries=0))["value"] == 5
    assert {k: (s["requests"], s["sent_429"]) for k, s in v.stats()["by_key"].items()} == {
        "-": (1, 0), "tok-acct-001": (2, 1),
    }
