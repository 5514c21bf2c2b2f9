"""The ``vendor`` suite: how many requests a second the demo vendor alone serves at 200 ms.

The in-flight regime of the harvest suite keeps 1,000 calls in flight at 200 ms: the vendor
must serve well above what any contender reaches there, or it is the bottleneck being
measured. For each HTTP layer (the builtin server, which the benchmark runs, and aiohttp) a
vendor of its own is started at 200 ms, and ``vendorload.vendor_capacity`` loads it with 1,000,
2,000 and 4,000 keep-alive connections (``--quick``: the builtin server, 1,000), at most 25
requests each and 8 s. The rate it served, its CPU per request and the latencies are reported
for each.
"""

from __future__ import annotations

from typing import Any

from benchmarks.core import Context, SuiteResult, Table, fmt_rate
from benchmarks.env import VendorHandle
from benchmarks.vendorload import vendor_capacity

LATENCY_MS = 200.0
CONNECTIONS = (1000, 2000, 4000)
SERVERS = ("builtin", "aiohttp")
REQUESTS_PER_CONNECTION = 25
SECONDS = 8.0


def vendor(ctx: Context) -> SuiteResult:
    servers = SERVERS[:1] if ctx.quick else SERVERS
    connections = CONNECTIONS[:1] if ctx.quick else CONNECTIONS
    result = SuiteResult("vendor", settings={
        "latency_ms": LATENCY_MS, "servers": list(servers), "connections": list(connections),
        "requests_per_connection": REQUESTS_PER_CONNECTION, "seconds": SECONDS,
        "client_processes": 2,
    })
    runs: list[dict[str, Any]] = []
    table = Table(
        f"Demo vendor capacity at {LATENCY_MS:g} ms (metric-day GETs over keep-alive "
        "connections, 2 client processes)",
        ["server", "connections", "requests/s", "ideal /s", "latency p50 / p99 ms",
         "vendor CPU ms / request", "vendor cores", "failed"],
        caption="requests/s: each client's answers from its first to its last, summed; ideal "
                "= connections / latency; the benchmark's vendor is the builtin server",
    )
    for server in servers:
        handle = VendorHandle(["--latency-ms", str(LATENCY_MS), "--server", server])
        try:
            for count in connections:
                found = vendor_capacity(handle, connections=count,
                                        requests=count * REQUESTS_PER_CONNECTION,
                                        seconds=SECONDS)
                found["server"] = server
                runs.append(found)
                ctx.log(f"  {server}, {count:,} connections: {found['rate_per_s']:,.0f} "
                        f"requests/s, {found['failed']} failed")
                table.rows.append([
                    server, f"{count:,}", fmt_rate(found["rate_per_s"]),
                    fmt_rate(found["ideal_per_s"]),
                    f"{found['latency_p50_ms']} / {found['latency_p99_ms']}",
                    f"{found['vendor_cpu_ms_per_request']:.3f}", f"{found['vendor_cores']:.2f}",
                    str(found["failed"]),
                ])
                if found["failed"]:
                    result.errors.append(f"{server}, {count} connections: {found['failed']} "
                                         f"failed ({', '.join(found['failures'])})")
        finally:
            handle.stop()
    result.figures = {"runs": runs,
                      "max_rate_per_s": {s: max(r["rate_per_s"] for r in runs
                                                if r["server"] == s) for s in servers}}
    result.tables.append(table)
    return result
