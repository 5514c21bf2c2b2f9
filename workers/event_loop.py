"""The event loop of a worker process, where the items of async stages run, many at once.

One asyncio loop per process, in a daemon thread (``fanout-loop``), started on first use (a
forked child starts its own). A worker thread that runs a claimed batch of an ``async def``
stage hands the batch's items to the loop (``ProcessLoop.run``) and waits for them all: their
vendor calls are in flight together instead of one after another, so a process's calls in
flight are bounded by the vendor and the limits, not by its threads.

``ProcessLoop.gate`` (``fair_gate.py``) gives the items their turns to run, whatever the
number of threads and batches: round-robin between the runs whose items wait, as many at
once as the process keeps up with (found as it runs), never more than its bound,
``FANOUT_MAX_IN_FLIGHT`` (``fanout worker --max-in-flight``), 1 to ``MAX_IN_FLIGHT`` (5,000),
1,000 by default. The HTTP connections per vendor host are as
many (``workers/http.py``), and the worker raises its open-file limit to fit them
(``ensure_open_files``, at its start: ``app.size_for_worker``). Hooks and the engine's Redis
calls for an item run on the loop's one thread, so the Redis pools are sized from the threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import resource
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from workers.fair_gate import START, FairGate, LimitFinder
from workers.settings import ConfigError, env_int

T = TypeVar("T")

MAX_IN_FLIGHT_ENV = "FANOUT_MAX_IN_FLIGHT"
DEFAULT_MAX_IN_FLIGHT = 1000
#: The largest bound accepted: each call in flight holds a socket to the vendor, and 5,000 per
#: process is already more than one vendor should see from one host.
MAX_IN_FLIGHT = 5000
#: File descriptors a worker process needs besides one per call in flight (Redis pools, the
#: sink, Celery's own connections, logs).
SPARE_FILES = 512


def check_max_in_flight(bound: int, name: str = MAX_IN_FLIGHT_ENV) -> int:
    """``bound`` when it is a bound a worker accepts; otherwise a ConfigError of one line
    naming ``name`` (the variable, or the option it came from)."""
    if not 1 <= bound <= MAX_IN_FLIGHT:
        raise ConfigError(f"{name} must be from 1 to {MAX_IN_FLIGHT:,}, got {bound}")
    return bound


def max_in_flight() -> int:
    """This process's bound on items in flight (``FANOUT_MAX_IN_FLIGHT``); a bad value is a
    ConfigError of one line."""
    return check_max_in_flight(env_int(MAX_IN_FLIGHT_ENV, DEFAULT_MAX_IN_FLIGHT))


def ensure_open_files(needed: int) -> None:
    """Raise this process's soft limit on open files to ``needed`` when it is lower (the
    common soft limit is 1,024); a hard limit below it is a ConfigError of one line."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ConfigError(f"{needed:,} open files are needed for {MAX_IN_FLIGHT_ENV}="
                          f"{max_in_flight()} and this worker's threads, but the hard limit "
                          f"is {hard:,} (ulimit -Hn): lower the bound or raise the limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class ProcessLoop:
    """An event loop running in its own daemon thread, with the turns of its items (the gate,
    whose limit its finder moves as the loop runs)."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.loop = asyncio.new_event_loop()
        self.gate = FairGate(bound, START)
        self.finder = LimitFinder(self.gate)
        self.thread = threading.Thread(target=self._serve, name="fanout-loop", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._finding = self.loop.create_task(self.finder.run())
        self.loop.run_forever()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop and wait for its result (from any other thread)."""
        return self.submit(coroutine).result()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coroutine`` on the loop (from any other thread); its future. From the
        loop's own thread it would wait for itself forever: refused."""
        if threading.current_thread() is self.thread:
            coroutine.close()
            raise RuntimeError("ProcessLoop was asked to wait on its own thread")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def busy(self) -> int:
        """Items in flight now (taken turns of the gate)."""
        return self.gate.held


_loops: dict[int, ProcessLoop] = {}
_lock = threading.Lock()


def process_loop() -> ProcessLoop:
    """This process's loop, started on first use (a forked child starts its own)."""
    pid = os.getpid()
    found = _loops.get(pid)
    if found is None:
        with _lock:
            found = _loops.get(pid)
            if found is None:
                found = _loops[pid] = ProcessLoop(max_in_flight())
    return found
