"""Rate-limited harvests, three cases: a fixed global rate (below), limits per API token
(``ratelimit_keys.py``) and a rate that finds an unannounced limit (``ratelimit_auto.py``).
``FANOUT_BENCH_RATELIMIT_CASES`` (comma-separated ``fixed``, ``keys``, ``auto``; default all)
runs only some of them.

Fixed rate: wall time against the bound ``requests / rate`` (DESIGN: <= 1.10x, zero
429s served, the vendor's highest one-second rate <= the limit, 3 or more worker processes).

The demo vendor answers at 0 ms and refuses (429 + Retry-After) anything above its own
``rate_limit_rps`` = R; fanout's global limit ``demo-vendor`` is set to ``R/s`` with burst 1, so
every vendor call of every worker thread goes through it. The harvest's request count is known
exactly (1 accounts listing + one services page per account + one call per metric-day), so the
fastest a harvest that never trips the vendor can take is ``requests / R`` seconds. fanout's
workers (3 processes x 8 threads) are started and answer a ping before the clock starts, and a
small warm-up harvest runs under the same limit; then the harvest is timed from just before the
trigger (which lists the accounts) to the run's end in the ledger.

A run that did not end ``succeeded`` with exactly its rows, or after which the vendor counted
another number of requests than the shape makes (a 429 means a request sent again), reports no
number.
"""

from __future__ import annotations

import itertools
import secrets
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.contenders import READY_TIMEOUT_S, FanoutHarness, Shape, WorkerConfig
from benchmarks.core import (
    BenchmarkError,
    Context,
    SuiteResult,
    Table,
    chosen_from_env,
    fmt_rate,
    fmt_ratio,
)
from benchmarks.harvest import WARMUP, _cpu, _per_wall

TARGET = 1.10  # DESIGN: wall <= 1.10 x requests / rate
CONFIG = WorkerConfig(3, "threads", 8)


@dataclass(frozen=True)
class Case:
    rate: int  # requests per second: fanout's limit and the vendor's own
    shape: Shape

    @property
    def requests(self) -> int:
        """The accounts listing, one services page per account, one call per metric-day."""
        return 1 + self.shape.accounts + self.shape.total

    @property
    def bound_s(self) -> float:
        return self.requests / self.rate


FULL = Case(100, Shape(5, 10, 30))  # 1 + 5 + 1,500 = 1,506 requests: 15.06 s at 100/s
QUICK = Case(50, Shape(2, 5, 20))  # 1 + 2 + 200 = 203 requests: 4.06 s at 50/s


CASES_ENV = "FANOUT_BENCH_RATELIMIT_CASES"
CASES = ("fixed", "keys", "auto")


def ratelimit(ctx: Context) -> SuiteResult:
    from benchmarks.ratelimit_auto import auto_rate
    from benchmarks.ratelimit_keys import per_key

    chosen = chosen_from_env(CASES_ENV, CASES)
    result = SuiteResult("ratelimit")
    # The fixed case's settings and figures stay at the top level, as before the other cases.
    more: dict[str, Callable[[Context], tuple[dict[str, Any], dict[str, Any], Table]]] = {
        "keys": per_key, "auto": auto_rate}
    for name in chosen:
        try:
            if name == "fixed":
                fixed = fixed_rate(ctx)
                result.settings.update(fixed.settings)
                result.figures.update(fixed.figures)
                result.tables += fixed.tables
                continue
            settings, figures, table = more[name](ctx)
        except Exception as exc:  # one broken case must not take the others' figures down
            ctx.console.print_exception(max_frames=5)
            result.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        result.settings[name] = settings
        result.figures[name] = figures
        result.tables.append(table)
    return result


def fixed_rate(ctx: Context) -> SuiteResult:
    from workers.connections import get_redis
    from workers.limits import Limits
    from workers.pipelines.demo import VENDOR_LIMIT

    case = QUICK if ctx.quick else FULL
    repeats = ctx.repeats_or(1)
    env = ctx.env
    vendor = env.vendor_handle
    env.flush()
    page_size = int(vendor.configure()["page_size"])
    for shape in (case.shape, WARMUP):
        if shape.services > page_size:
            raise BenchmarkError(f"{shape.services} services per account would take more than "
                                 f"one page of {page_size}: the request count would not be exact")
    limits = Limits(get_redis())
    limit_text = f"{case.rate}/s"
    settings: dict[str, Any] = {
        "limit": {"name": VENDOR_LIMIT, "rate": limit_text, "burst": 1},
        "vendor": {"rate_limit_rps": case.rate, "latency_ms": 0, "page_size": page_size},
        "shape": {**asdict(case.shape), "total": case.shape.total},
        "requests": case.requests, "processes": CONFIG.processes, "pool": CONFIG.pool,
        "concurrency": CONFIG.concurrency, "repeats": repeats, "http_retries": 0,
        "warmup_shape": asdict(WARMUP), "target_wall_over_bound": TARGET,
    }
    ctx.log(f"  fanout: {CONFIG.label}, limit {VENDOR_LIMIT} {limit_text} burst 1, vendor "
            f"429s above {case.rate} rps, shape {case.shape.label} = {case.requests:,} requests "
            f"(bound {case.bound_s:.2f} s), {repeats} run(s)")
    # Both limits before any worker starts: a worker reads a limit's configuration at most
    # once a second, and must never have seen the limit unset.
    vendor.configure(latency_ms=0, rate_limit_rps=case.rate, accounts=WARMUP.accounts,
                     services=WARMUP.services)
    limits.set_limit(VENDOR_LIMIT, rate=limit_text, burst=1)
    suite_dir = env.suite_dir(f"ratelimit-{secrets.token_hex(3)}")
    harness = FanoutHarness()
    procs = harness.start(env, CONFIG, suite_dir)
    runs: list[dict[str, Any]] = []
    try:
        harness.wait_ready(procs, suite_dir, READY_TIMEOUT_S)
        vendor.reset()
        harness.run(env, WARMUP, suite_dir)
        _check_vendor(vendor.stats(), 1 + WARMUP.accounts + WARMUP.total, "warm-up")
        vendor.configure(accounts=case.shape.accounts, services=case.shape.services)
        pids = [p.pid for p in procs]
        for _ in range(repeats):
            vendor.reset()
            cpu_before = _cpu(env, pids)
            outcome = harness.run(env, case.shape, suite_dir)
            cpu_after = _cpu(env, pids)
            stats = vendor.stats()
            _check_vendor(stats, case.requests, "timed run")
            run = _figures(case, outcome.wall_s, stats, ctx.cpu_count,
                           cpu_after["workers"] - cpu_before["workers"])
            run["cores_used"] = _per_wall(cpu_before, cpu_after, outcome.wall_s)
            run["checks"] = {**outcome.checks, "vendor_requests": stats["total"]}
            runs.append(run)
            ctx.log(f"    wall {run['wall_s']:.2f} s = {run['wall_over_bound']:.3f}x the bound "
                    f"{case.bound_s:.2f} s; 429s {run['sent_429']}, vendor max "
                    f"{run['vendor_max_rps_1s']} in 1 s; vendor span "
                    f"{run['vendor_span_s']:.2f} s, median gap {run['median_gap_ms']:.2f} ms")
    finally:
        env.stop_processes(procs)
        limits.delete_limit(VENDOR_LIMIT)
        vendor.configure(latency_ms=env.latency_ms, rate_limit_rps=0)
    median = sorted(runs, key=lambda r: float(r["wall_s"]))[(len(runs) - 1) // 2]
    figures = {key: median[key] for key in (
        "requests", "rate_limit", "bound_s", "wall_s", "wall_over_bound", "meets_target",
        "sent_429", "vendor_max_rps_1s", "vendor_span_s", "vendor_rate", "outside_span_s",
        "median_gap_ms", "max_gap_ms", "worker_cpu_ms_per_request", "worker_ceiling_rps",
    )}
    figures["runs"] = runs
    return SuiteResult("ratelimit", settings=settings, figures=figures,
                       tables=[_table(case, median, runs, ctx)])


def _check_vendor(stats: dict[str, Any], expected: int, what: str) -> None:
    """Every request exactly once: a 429 (a request that has to be sent again) or a listing
    of more pages shows up as another count."""
    if stats["total"] != expected:
        raise BenchmarkError(
            f"{what}: the vendor served {stats['total']} requests, expected {expected} "
            f"(429s {stats['sent_429']}, max in 1 s {stats['max_rps_1s']}, "
            f"by endpoint {stats['by_endpoint']})"
        )


def _figures(
    case: Case, wall_s: float, stats: dict[str, Any], cores: int, worker_cpu_s: float
) -> dict[str, Any]:
    arrivals = sorted(float(t) for t in stats["recent_arrivals"])
    if len(arrivals) != stats["total"]:  # the vendor keeps the last 5,000 arrivals only
        arrivals = []
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    span_s = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
    cpu_ms = worker_cpu_s * 1000 / case.requests
    ratio = wall_s / case.bound_s
    max_rps = int(stats["max_rps_1s"])
    return {
        "requests": case.requests,
        "rate_limit": case.rate,
        "bound_s": round(case.bound_s, 3),
        "wall_s": round(wall_s, 3),
        "wall_over_bound": round(ratio, 3),
        "meets_target": ratio <= TARGET and stats["sent_429"] == 0 and max_rps <= case.rate,
        "sent_429": int(stats["sent_429"]),
        "vendor_max_rps_1s": max_rps,
        # At the vendor: from the first request (the accounts listing) to the last leaf's.
        "vendor_span_s": round(span_s, 3),
        "vendor_rate": round((len(arrivals) - 1) / span_s, 1) if span_s else None,
        # Before the first request (trigger, run creation) and after the last (the leaf's
        # write, the ledger finishing the run, the waiter waking).
        "outside_span_s": round(wall_s - span_s, 3) if span_s else None,
        "median_gap_ms": round(statistics.median(gaps) * 1000, 2) if gaps else None,
        "max_gap_ms": round(max(gaps) * 1000, 2) if gaps else None,
        "worker_cpu_ms_per_request": round(cpu_ms, 3),
        # Requests per second the workers' CPU could sustain on this machine with no limit.
        "worker_ceiling_rps": round(cores * 1000 / cpu_ms) if cpu_ms > 0 else None,
    }


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _table(
    case: Case, run: dict[str, Any], runs: list[dict[str, Any]], ctx: Context
) -> Table:
    from workers.throttle import HEADROOM

    shape = case.shape
    interval_ms = 1000 / case.rate
    rows = [
        ["limit", f"demo-vendor {case.rate}/s burst 1; vendor 429s above {case.rate} rps"],
        ["workers", f"{CONFIG.label}, 0 ms vendor latency"],
        ["requests", f"1 + {shape.accounts} + {shape.label} = {case.requests:,}"],
        ["bound: requests / rate", f"{case.bound_s:.2f} s"],
        ["wall (trigger to run end)", f"{run['wall_s']:.2f} s"],
        ["wall / bound", f"{fmt_ratio(run['wall_over_bound'])}  "
                         f"(target <= {TARGET:.2f}x: {_met(run['wall_over_bound'] <= TARGET)})"],
        ["429s served", f"{run['sent_429']}  (target 0: {_met(run['sent_429'] == 0)})"],
        ["vendor's max requests in 1 s", f"{run['vendor_max_rps_1s']}  (limit {case.rate}: "
                                         f"{_met(run['vendor_max_rps_1s'] <= case.rate)})"],
    ]
    if run["vendor_rate"] is not None:
        rows += [
            ["at the vendor: first to last request",
             f"{run['vendor_span_s']:.2f} s = {run['vendor_rate']:.1f} requests/s"],
            ["gap between requests: median / max",
             f"{run['median_gap_ms']:.2f} / {run['max_gap_ms']:.2f} ms "
             f"(1 / rate = {interval_ms:.2f} ms)"],
            ["wall outside that span", f"{run['outside_span_s']:.2f} s"],
        ]
    rows += [
        ["worker CPU per request", f"{run['worker_cpu_ms_per_request']:.2f} ms: CPU alone "
                                   f"would allow {fmt_rate(run['worker_ceiling_rps'])} "
                                   f"requests/s on {ctx.cpu_count} cores"],
    ]
    if len(runs) > 1:
        rows.append(["walls of all runs", ", ".join(f"{r['wall_s']:.2f} s" for r in runs)])
    return Table(
        f"Rate-limited harvest: {case.requests:,} requests at {case.rate}/s",
        ["what", "value"], rows,
        caption=f"median of {len(runs)} run(s); fanout's throttle spaces calls "
                f"{HEADROOM:.2f} x 1 / rate apart (workers.throttle.HEADROOM), so about "
                f"{HEADROOM:.2f}x is the floor",
    )

