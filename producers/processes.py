"""Child processes that ``fanout demo``, the tests and the benchmarks start: the demo vendor
and Celery workers, each a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery

#: The worker pool that suits I/O-bound harvesting: threads share one pooled HTTP client.
#: One process per core (a process's GIL caps it below one core), each with 32 threads:
#: on 2 cores 2 x 32 beat 2 x 64 (GIL contention) and 1 x 32 (benchmarks/).
DEFAULT_POOL = "threads"
DEFAULT_CONCURRENCY = 32


def default_processes() -> int:
    return max(1, os.cpu_count() or 1)


@dataclass
class Vendor:
    process: subprocess.Popen[str]
    url: str

    def stop(self) -> None:
        stop_process(self.process)


def start_vendor(options: Sequence[str] = (), *, timeout_s: float = 15.0) -> Vendor:
    """Start ``python -m demo_vendor serve --port 0 OPTIONS`` and wait for its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "demo_vendor", "serve", "--port", "0", *options],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    line = ""
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if "listening on " in line or not line:
            break
    if "listening on " not in line:
        stop_process(process)
        raise RuntimeError(f"the demo vendor did not start: {line!r}")
    return Vendor(process, line.rsplit("listening on ", 1)[1].strip())


def worker_command(
    *,
    pool: str = DEFAULT_POOL,
    concurrency: int = DEFAULT_CONCURRENCY,
    name: str | None = None,
    queues: Sequence[str] = (),
    loglevel: str = "WARNING",
    extra: Sequence[str] = (),
) -> list[str]:
    cmd = [
        sys.executable, "-m", "celery", "-A", "workers", "worker",
        "--pool", pool, "--concurrency", str(concurrency), "--loglevel", loglevel,
        "--without-mingle", "--without-gossip",
    ]
    if name:
        cmd += ["--hostname", name]
    if queues:
        cmd += ["--queues", ",".join(queues)]
    return [*cmd, *extra]


def start_worker(
    env: Mapping[str, str] | None = None,
    *,
    log_path: str | None = None,
    **options: object,
) -> subprocess.Popen[bytes]:
    """Start one Celery worker process (its own session, so a signal reaches only it)."""
    full_env = {**os.environ, **(env or {})}
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        worker_command(**options),  # type: ignore[arg-type]
        env=full_env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_process(process: subprocess.Popen[Any], timeout_s: float = 20) -> None:
    """Warm shutdown (SIGTERM: finish what is running), then SIGKILL if it hangs."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def supervise_workers(count: int, env: Mapping[str, str], options: Mapping[str, Any]) -> int:
    """Run ``count`` Celery worker processes in the foreground; SIGTERM/SIGINT reach each
    (warm shutdown). Returns the worst exit code."""
    children = [
        subprocess.Popen(worker_command(name=f"fanout{i}@%h", **options), env=dict(env))
        for i in range(1, count + 1)
    ]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)


def shutdown_workers(broker_url: str, timeout_s: float = 15.0) -> int:
    """Ask every Celery worker on ``broker_url`` to shut down warmly (a broadcast), and wait
    until none answers a ping. Returns how many answered at first."""
    app = Celery("fanout-control", broker=broker_url)
    try:
        first = app.control.ping(timeout=1.0) or []
        if first:
            app.control.shutdown()
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and app.control.ping(timeout=0.5):
                pass
        return len(first)
    finally:
        app.close()
