"""Child processes that ``fanout demo``, ``fanout worker``, the tests and the benchmarks start:
the demo vendor and Celery workers, each a real process.

Each child runs in its own session (a terminal's Ctrl-C reaches only its parent, which decides
what to tell it) and, on Linux, with a parent-death signal: it gets one (SIGTERM unless told
otherwise) when the thread that started it dies, however it dies (SIGKILL included), so nothing
is left behind. Start children from a thread that lives as long as they should.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from celery import Celery

#: The worker pool that suits I/O-bound harvesting: threads share one pooled HTTP client.
#: One process per core (a process's GIL caps it below one core), each with 32 threads:
#: on 2 cores 2 x 32 beat 2 x 64 (GIL contention) and 1 x 32 (benchmarks/).
DEFAULT_POOL = "threads"
DEFAULT_CONCURRENCY = 32
#: The most threads, or items of async stages in flight, ``fanout worker`` and ``fanout demo``
#: accept per process (``workers/event_loop.py: MAX_IN_FLIGHT``).
MAX_PER_PROCESS = 5000


def default_processes() -> int:
    return max(1, os.cpu_count() or 1)


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up here in the parent: the child, between fork and exec, only
    calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def die_with_parent(death_signal: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that sends the child ``death_signal`` when the calling thread of this
    process dies (Linux's parent-death signal, kept across exec); None where there is none."""
    prctl = _PRCTL
    if prctl is None:
        return None
    parent_pid = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, death_signal)
        if os.getppid() != parent_pid:  # the parent died before prctl: no signal will come
            os.kill(os.getpid(), death_signal)

    return preexec


def spawn(
    command: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    text: bool = False,
    death_signal: int = signal.SIGTERM,
) -> subprocess.Popen[Any]:
    """Start ``command`` in a session of its own; it gets ``death_signal`` when this process
    dies (see the module)."""
    return subprocess.Popen(
        list(command),
        env=None if env is None else dict(env),
        stdout=stdout,
        stderr=stderr,
        text=text,
        start_new_session=True,
        preexec_fn=die_with_parent(death_signal),  # fork-safe: only prctl, getppid and kill
    )


@dataclass
class Vendor:
    process: subprocess.Popen[str]
    url: str

    def stop(self) -> None:
        stop_process(self.process)


def start_vendor(options: Sequence[str] = (), *, timeout_s: float = 15.0) -> Vendor:
    """Start ``python -m demo_vendor serve --port 0 OPTIONS`` and wait for its URL."""
    process = spawn(
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
    max_in_flight: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """``celery worker`` with fanout's defaults. ``max_in_flight``: the items of async stages
    in flight per process (``workers/event_loop.py``; default: the worker's own)."""
    cmd = [
        sys.executable, "-m", "celery", "-A", "workers", "worker",
        "--pool", pool, "--concurrency", str(concurrency), "--loglevel", loglevel,
        "--without-mingle", "--without-gossip",
    ]
    if max_in_flight is not None:
        cmd += ["--max-in-flight", str(max_in_flight)]
    if name:
        cmd += ["--hostname", name]
    if queues:
        cmd += ["--queues", ",".join(queues)]
    return [*cmd, *extra]


def start_worker(
    env: Mapping[str, str] | None = None,
    *,
    log_path: str | None = None,
    death_signal: int = signal.SIGTERM,
    **options: object,
) -> subprocess.Popen[bytes]:
    """Start one Celery worker process (its own session, so a signal reaches only it; it
    gets ``death_signal`` when this process dies: SIGTERM is a warm shutdown)."""
    full_env = {**os.environ, **(env or {})}
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return spawn(
        worker_command(**options),  # type: ignore[arg-type]
        full_env,
        stdout=out,
        stderr=subprocess.STDOUT,
        death_signal=death_signal,
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


def stop_all(children: Iterable[subprocess.Popen[Any]], grace_s: float) -> None:
    """SIGTERM every child at once (a worker's warm shutdown), then SIGKILL the process group
    of any still running after ``grace_s``."""
    alive = [child for child in children if child.poll() is None]
    for child in alive:
        child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in alive:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_group(child)


def kill_group(child: subprocess.Popen[Any]) -> None:
    """SIGKILL a child started by ``spawn`` and what it started, and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)  # a session leader: its group is its own
    child.wait()


def worker_names(broker_url: str, timeout_s: float = 0.5) -> list[str]:
    """The names of the Celery workers on ``broker_url`` that answer a ping within
    ``timeout_s`` (the ping always takes that long: it cannot know how many will answer)."""
    app = Celery("fanout-control", broker=broker_url)
    try:
        replies = app.control.ping(timeout=timeout_s) or []
        return sorted(name for reply in replies for name in reply)
    finally:
        app.close()


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
