"""Throughput check: ``python -m demo_vendor.loadcheck URL --seconds 3 --concurrency 64``.

Hammers ``GET /fib/10`` over keep-alive httpx connections and prints
requests/second.  A script, not a test: timing assertions are flaky in CI.

Each of the ``--concurrency`` threads owns a sync one-connection
``httpx.Client``, created and warmed up before the clock starts.  Measured
alternatives were slower *client-side*: an AsyncClient with one shared pool
of 64 connections rescans the whole pool on every request, and sync httpx is
about twice as fast per request as async.  httpx tops out near 1,000
requests/second per process, so use ``--processes N`` to see more of the
server's capacity.

``--vendor-pid PID`` (Linux) also reads the vendor's CPU time (utime + stime
from ``/proc/PID/stat``) over the timed window and prints CPU milliseconds per
request and the share of one core the vendor would use at ``--at-rps``
requests/second (default 2,000): the benchmark's load on a 2-core machine.

Measured on the 2-core dev machine (Python 3.11, aiohttp 3.14; medians of 5
runs of 8 s, 64 connections, vendor pinned to one core and the client to the
other): the builtin server 0.066 ms CPU/request (13% of a core at 2,000
requests/second), aiohttp 0.104 ms (21%), 1.6x: the builtin stays the default.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx

PATH = "/fib/10"


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime and stime fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _hammer(
    url: str, seconds: float, concurrency: int, on_window: Callable[[], None] | None = None
) -> tuple[int, int, float]:
    # verify=False: skip loading the CA bundle per client (plain http anyway).
    clients = [httpx.Client(base_url=url, timeout=10, verify=False) for _ in range(concurrency)]
    for client in clients:
        client.get(PATH)  # open the connection outside the timed window
    counts = [0, 0]  # [ok, failed]
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)
    deadline = 0.0

    def worker(client: httpx.Client) -> None:
        ok = failed = 0
        start.wait()
        while time.monotonic() < deadline:
            try:
                status = client.get(PATH).status_code
            except httpx.HTTPError:
                status = 0
            if status == 200:
                ok += 1
            else:
                failed += 1
        with lock:
            counts[0] += ok
            counts[1] += failed

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    if on_window is not None:
        on_window()
    started = time.monotonic()
    deadline = started + seconds
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    if on_window is not None:
        on_window()
    for client in clients:
        client.close()
    return counts[0], counts[1], elapsed


def _run_one(
    job: tuple[str, float, int], on_window: Callable[[], None] | None = None
) -> tuple[int, int, float]:
    return _hammer(*job, on_window=on_window)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo_vendor.loadcheck")
    parser.add_argument("url", help="base URL, e.g. http://127.0.0.1:8765")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=64, help="total connections")
    parser.add_argument("--processes", type=int, default=1, help="client processes")
    parser.add_argument("--vendor-pid", type=int, help="measure this process's CPU time")
    parser.add_argument("--at-rps", type=float, default=2000.0, help="rate for the core share")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.processes < 1 or args.seconds <= 0:
        parser.error("--concurrency, --processes and --seconds must be positive")
    url = args.url.rstrip("/")
    procs = min(args.processes, args.concurrency)
    per_proc = [args.concurrency // procs + (i < args.concurrency % procs) for i in range(procs)]
    jobs = [(url, args.seconds, n) for n in per_proc]
    cpu_window: list[float] = []
    cpu_requests = 0  # requests served inside the CPU window besides the counted ones

    def on_window() -> None:
        if args.vendor_pid is not None:
            cpu_window.append(process_cpu_seconds(args.vendor_pid))

    if len(jobs) == 1:
        results = [_run_one(jobs[0], on_window)]
    else:
        with ProcessPoolExecutor(len(jobs)) as pool:
            # Each client process marks its own window; read the vendor's CPU
            # around the whole pool run instead, which also serves the warm-ups.
            cpu_requests = args.concurrency
            on_window()
            results = list(pool.map(_run_one, jobs))
            on_window()
    ok = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    elapsed = max(r[2] for r in results)
    print(
        f"{ok} ok, {failed} failed in {elapsed:.2f}s over {args.concurrency} connections: "
        f"{ok / elapsed:.0f} requests/second"
    )
    if len(cpu_window) == 2 and ok + failed:
        cpu_ms = (cpu_window[1] - cpu_window[0]) * 1000 / (ok + failed + cpu_requests)
        share = cpu_ms / 1000 * args.at_rps
        print(
            f"vendor CPU {cpu_ms:.3f} ms/request ({cpu_window[1] - cpu_window[0]:.2f}s CPU): "
            f"{share:.0%} of one core at {args.at_rps:,.0f} requests/second"
        )
    return 0 if ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
