"""The demo vendor's own capacity: can it serve the harvest's in-flight bound at its latency?

``python -m benchmarks.vendorload URL --connections N --requests R --seconds S`` is one client
process: N keep-alive connections on asyncio streams, each sending ``GET`` of a metric-day (the
harvest's leaf request) as soon as the last answer came back, until R requests were answered
or S seconds passed, whichever is first. It prints one JSON line: answered, failed, seconds, the
latencies' percentiles and the steady rate (from its first answer to its last). A raw HTTP/1.1
client (no httpx, no aiohttp) so the client side costs little CPU next to the vendor on a
2-core machine.

``vendor_capacity(vendor, ...)`` runs P such processes at once against a demo vendor and
reports the rate it served, the ideal rate (connections / latency) and the vendor's CPU per
request: the vendor is not the harvest's bottleneck when it serves at least the contenders'
in-flight bound / latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from benchmarks.env import VendorHandle

#: An answer slower than this counts as failed: the vendor is then queueing, not serving.
REQUEST_TIMEOUT_S = 30.0
CONNECT_BATCH = 200  # connections opened at a time (the vendor's listen backlog is 1,024)


async def _one_connection(
    host: str, port: int, paths: list[str], budget: list[int], deadline: float,
    latencies: list[float], answered_at: list[float], failures: list[str],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        i = 0
        while budget[0] > 0 and time.monotonic() < deadline:
            budget[0] -= 1
            path = paths[i % len(paths)]
            i += 1
            request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
            started = time.monotonic()
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            status = int(head.split(b" ", 2)[1])
            if status == 200:
                latencies.append(time.monotonic() - started)
                answered_at.append(time.monotonic())
            else:
                failures.append(f"HTTP {status}")
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        failures.append(type(exc).__name__)
    finally:
        writer.close()


async def _load(url: str, paths: list[str], connections: int, requests: int,
                seconds: float) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    latencies: list[float] = []
    answered_at: list[float] = []
    failures: list[str] = []
    budget = [requests]
    started = time.monotonic()
    deadline = started + seconds
    tasks = []
    for first in range(0, connections, CONNECT_BATCH):
        batch = [asyncio.create_task(_one_connection(host, port, paths, budget, deadline,
                                                     latencies, answered_at, failures))
                 for _ in range(first, min(connections, first + CONNECT_BATCH))]
        tasks += batch
        await asyncio.sleep(0)  # let this batch connect before the next
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    ordered = sorted(latencies)

    def pct(share: float) -> float | None:
        return round(ordered[int(share * (len(ordered) - 1))] * 1000, 1) if ordered else None

    # The steady rate: answers after the first one, over the time from the first to the last
    # (the first wave waits one latency before any answer comes back).
    span = max(answered_at) - min(answered_at) if len(answered_at) > 1 else 0.0
    return {"answered": len(latencies), "failed": len(failures),
            "failures": sorted(set(failures))[:5], "seconds": round(elapsed, 3),
            "steady_rate": round((len(answered_at) - 1) / span, 1) if span else None,
            "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
                           "max": pct(1.0)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vendorload")
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--path", action="append", required=True,
                        help="a path to GET (repeatable; used in turn)")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.requests < 1 or args.seconds <= 0:
        parser.error("--connections, --requests and --seconds must be positive")
    result = asyncio.run(_load(args.url.rstrip("/"), args.path, args.connections,
                               args.requests, args.seconds))
    print(json.dumps(result))
    return 0


def vendor_capacity(
    vendor: VendorHandle, *, connections: int, requests: int, seconds: float,
    processes: int = 2,
) -> dict[str, Any]:
    """``processes`` client processes with ``connections`` in all load ``vendor`` (at its
    configured latency) with metric-day GETs, ``requests`` in all, for at most ``seconds``.
    Returns what it served, against the ideal connections / latency."""
    from benchmarks.env import cpu_seconds, python

    config = vendor.configure(accounts=1, services=10)
    latency_ms = float(config["latency_ms"])
    base = vendor.url
    import httpx

    account = httpx.get(f"{base}/accounts", timeout=30).json()["accounts"][0]["id"]
    listing = httpx.get(f"{base}/accounts/{account}/services", timeout=30).json()["services"]
    paths = [f"/accounts/{account}/services/{s['id']}/metrics?day=2026-01-{d:02d}"
             for s in listing for d in range(1, 29)]
    vendor.reset()
    per_process = [connections // processes + (i < connections % processes)
                   for i in range(processes)]
    budgets = [requests // processes + (i < requests % processes) for i in range(processes)]
    cpu_before = cpu_seconds([vendor.pid])
    started = time.perf_counter()
    clients = [
        subprocess.Popen(
            [python(), "-m", "benchmarks.vendorload", base, "--connections", str(n),
             "--requests", str(budget), "--seconds", str(seconds),
             *(arg for p in paths for arg in ("--path", p))],
            stdout=subprocess.PIPE, text=True,
        )
        for n, budget in zip(per_process, budgets, strict=True)
    ]
    outputs = [c.communicate(timeout=seconds + REQUEST_TIMEOUT_S + 30)[0] for c in clients]
    wall = time.perf_counter() - started
    vendor_cpu = cpu_seconds([vendor.pid]) - cpu_before
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    answered = sum(r["answered"] for r in results)
    failed = sum(r["failed"] for r in results)
    window = max(r["seconds"] for r in results)
    served = vendor.metric_requests()
    return {
        "latency_ms": latency_ms,
        "connections": connections,
        "client_processes": processes,
        "requests_budget": requests,
        "seconds_budget": seconds,
        "answered": answered,
        "failed": failed,
        "failures": sorted({f for r in results for f in r["failures"]}),
        "vendor_counted": served,
        "window_s": window,
        # Each client's answers from its first to its last, summed over the clients.
        "rate_per_s": round(sum(r["steady_rate"] or 0 for r in results), 1),
        "rate_over_window_per_s": round(answered / window, 1) if window else None,
        "ideal_per_s": round(connections * 1000 / latency_ms, 1) if latency_ms else None,
        "latency_p50_ms": round(statistics.median(r["latency_ms"]["p50"] for r in results
                                                  if r["latency_ms"]["p50"] is not None), 1)
        if answered else None,
        "latency_p99_ms": max((r["latency_ms"]["p99"] for r in results
                               if r["latency_ms"]["p99"] is not None), default=None),
        "vendor_cpu_ms_per_request": round(vendor_cpu * 1000 / max(1, served), 4),
        "vendor_cores": round(vendor_cpu / wall, 2),
        "wall_s": round(wall, 3),
    }


if __name__ == "__main__":
    sys.exit(main())
