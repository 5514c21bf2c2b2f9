"""Worker RSS per call in flight: what a worker process pays in memory for each item of an
async stage waiting on the vendor (part of the ``memory`` suite).

One fanout worker process (32 threads) at a time, its in-flight bound first ``LOW`` then
``HIGH`` (``--max-in-flight``), harvests enough metric-days from a vendor that answers after
``LATENCY_MS``: the calls pile up at the vendor until its count of calls in flight stops
rising (at least 90% of the bound: 32 threads x 32 claimed can hold 1,024, but a thread
busy with a batch cannot fan out more leaves meanwhile), and the worker's RSS (its process
tree) is read while they wait. The cost of one call in flight is the RSS difference divided
by the difference of calls in flight: everything else (the interpreter, Celery, the claimed
messages of 32 threads, the pools) is in both.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from benchmarks.core import BenchmarkError, Context
from benchmarks.env import rss_bytes

LOW, HIGH = 10, 1000
LATENCY_MS = 5000
# 2 x 20 x 30 = 1,200 metric-days: more than 32 threads x 32 claimed can hold (1,024).
ACCOUNTS, SERVICES, DAYS = 2, 20, 30
THREADS = 32
SETTLE_S = 1.0  # calls in flight steady this long, then RSS read over as long (the largest)


def _rss_with_calls_in_flight(ctx: Context, bound: int) -> dict[str, Any]:
    from benchmarks.harvest import END_DAY, READY_TIMEOUT_S, FanoutHarness, WorkerConfig
    from producers.trigger import start_run

    env = ctx.env
    vendor = env.vendor_handle
    suite_dir = env.suite_dir(f"in-flight-{bound}-{secrets.token_hex(3)}")
    env.flush()
    harness = FanoutHarness({"FANOUT_MAX_IN_FLIGHT": str(bound)})
    procs = harness.start(env, WorkerConfig(1, "threads", THREADS), suite_dir)
    try:
        harness.wait_ready(procs, suite_dir, READY_TIMEOUT_S)
        vendor.configure(accounts=ACCOUNTS, services=SERVICES, latency_ms=LATENCY_MS)
        vendor.reset()
        start_run("demo", {"days": DAYS, "end_day": END_DAY, "vendor_url": vendor.url,
                           "http_retries": 0})
        deadline = time.monotonic() + 120
        seen, still_since = 0, time.monotonic()
        while seen < 0.9 * bound or time.monotonic() - still_since < SETTLE_S:
            if time.monotonic() > deadline:
                raise BenchmarkError(f"the vendor never saw {bound} calls in flight "
                                     f"(saw {vendor.stats()['max_in_flight']})")
            time.sleep(0.1)
            now = vendor.stats()["in_flight"]
            if now != seen:
                seen, still_since = now, time.monotonic()
        rss = 0
        until = time.monotonic() + SETTLE_S
        while time.monotonic() < until:
            rss = max(rss, rss_bytes([p.pid for p in procs]))
            time.sleep(0.1)
        stats = vendor.stats()
    finally:
        env.stop_processes(procs, timeout_s=1)
        vendor.configure(latency_ms=env.latency_ms)
    if stats["max_in_flight"] > bound:
        raise BenchmarkError(f"the vendor saw {stats['max_in_flight']} calls in flight, "
                             f"more than the bound {bound}")
    if stats["in_flight"] != seen:
        raise BenchmarkError(f"the calls in flight moved from {seen} to {stats['in_flight']} "
                             "while the RSS was read: raise LATENCY_MS")
    return {"bound": bound, "rss_bytes": rss, "in_flight": seen}


def in_flight_rss(ctx: Context) -> dict[str, Any]:
    """RSS of one worker process at ``LOW`` and ``HIGH`` calls in flight, and per call."""
    ctx.log(f"  worker RSS with {LOW} and {HIGH} calls in flight ({LATENCY_MS} ms vendor)")
    low = _rss_with_calls_in_flight(ctx, LOW)
    high = _rss_with_calls_in_flight(ctx, HIGH)
    per_call = (high["rss_bytes"] - low["rss_bytes"]) / (high["in_flight"] - low["in_flight"])
    return {"threads": THREADS, "vendor_latency_ms": LATENCY_MS, "low": low, "high": high,
            "bytes_per_call_in_flight": round(per_call)}
