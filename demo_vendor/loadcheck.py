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
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import httpx

PATH = "/fib/10"


def _hammer(url: str, seconds: float, concurrency: int) -> tuple[int, int, float]:
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
    started = time.monotonic()
    deadline = started + seconds
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    for client in clients:
        client.close()
    return counts[0], counts[1], elapsed


def _run_one(job: tuple[str, float, int]) -> tuple[int, int, float]:
    return _hammer(*job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo_vendor.loadcheck")
    parser.add_argument("url", help="base URL, e.g. http://127.0.0.1:8765")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=64, help="total connections")
    parser.add_argument("--processes", type=int, default=1, help="client processes")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.processes < 1 or args.seconds <= 0:
        parser.error("--concurrency, --processes and --seconds must be positive")
    url = args.url.rstrip("/")
    procs = min(args.processes, args.concurrency)
    per_proc = [args.concurrency // procs + (i < args.concurrency % procs) for i in range(procs)]
    jobs = [(url, args.seconds, n) for n in per_proc]
    if len(jobs) == 1:
        results = [_run_one(jobs[0])]
    else:
        with ProcessPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(_run_one, jobs))
    ok = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    elapsed = max(r[2] for r in results)
    print(
        f"{ok} ok, {failed} failed in {elapsed:.2f}s over {args.concurrency} connections: "
        f"{ok / elapsed:.0f} requests/second"
    )
    return 0 if ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
