"""The harvest suite's two regimes and, in each, the worker settings every contender may run.

- ``threads`` (vendor latency under 100 ms; the default 20 ms, and 0 ms): each contender on
  the worker shapes its own docs offer, threads and processes of a few dozen calls in flight;
- ``in-flight`` (100 ms and more, ``--latency-ms 200``): I/O-bound, where a call waits far
  longer than it computes, so what counts is how many calls a worker keeps in flight. Every
  contender gets the same in-flight bound, ``IN_FLIGHT`` calls on the whole machine: Celery
  with its gevent pool (``-P gevent -c 1000``, its Concurrency guide's command for I/O-bound
  work), Dramatiq under its ``dramatiq-gevent`` launcher and with async actors, fanout with
  whatever it has (``fanout_in_flight_shapes``).

A ``Family`` is the contenders that share one worker configuration (the ``celery`` family: the
Celery rows of every leaf kind). Its candidates are worker ``shapes`` (pool, processes,
concurrency), then ``variations`` of the fastest shape (a library's other knobs); the harvest
suite runs each once and keeps the fastest (``benchmarks/harvest.py``), unless ``--no-sweep``,
which takes each family's first shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.contenders import (
    CeleryBaselineHarness,
    DramatiqHarness,
    FanoutHarness,
    Harness,
    WorkerConfig,
)
from producers.processes import DEFAULT_CONCURRENCY, DEFAULT_POOL, default_processes

THREADS = "threads"
IN_FLIGHT_REGIME = "in-flight"
#: At this vendor latency and above, the harvest suite runs the in-flight regime.
IN_FLIGHT_LATENCY_MS = 100.0
#: Calls in flight on the whole machine, for every contender of the in-flight regime: Celery's
#: documented ``-c 1000`` (split evenly when a contender runs several processes).
IN_FLIGHT = 1000

#: fanout's own defaults (`fanout worker`): one process per core, 32 threads each, chosen by
#: the ``pools`` suite.
FANOUT_THREADS = WorkerConfig(default_processes(), DEFAULT_POOL, DEFAULT_CONCURRENCY)

# Celery: the Optimizing guide's advice for many short tasks is a large prefetch multiplier
# ("Say 64, or 128"); the Canvas guide's bulk sending is a group (one producer for all) or
# chunks; the worker sends task events (-E) as fanout's do, for Flower.
CELERY_PREFETCH = 64
CELERY_DEFAULTS: dict[str, Any] = {"prefetch": CELERY_PREFETCH, "publish": "group",
                                   "events": True}
CELERY_VARIATIONS: tuple[dict[str, Any], ...] = (
    {"prefetch": None},  # Celery's default multiplier, 4
    {"publish": "each"},  # one .delay() per child
    {"publish": "chunks:10"},
    {"publish": "chunks:30"},  # one message per service's 30 days
)


@dataclass(frozen=True)
class Family:
    """Contenders that share one worker configuration, and its candidates."""

    name: str
    make: Callable[[str], Harness]  # leaf kind -> a fresh harness
    shapes: tuple[WorkerConfig, ...]
    variations: tuple[dict[str, Any], ...] = ()
    why: str = ""  # where its settings come from

    def varied(self, best: WorkerConfig) -> list[WorkerConfig]:
        """The variations applied to ``best``, leaving out those that change nothing."""
        out = []
        for change in self.variations:
            config = dataclasses.replace(best, **change)
            if config != best and config not in out:
                out.append(config)
        return out


def regime_of(latency_ms: float) -> str:
    return IN_FLIGHT_REGIME if latency_ms >= IN_FLIGHT_LATENCY_MS else THREADS


def fanout_in_flight_shapes(in_flight: int) -> tuple[WorkerConfig, ...]:
    """Where fanout's in-flight engine (issue #20) plugs in: its worker settings at an
    in-flight bound of ``in_flight`` calls on the machine, e.g. ``WorkerConfig(2, "threads",
    in_flight // 2, worker_args=("--max-in-flight", ...))`` or a pool of its own. Empty until
    that engine lands: the in-flight regime then runs fanout on today's threads alone. Its
    workers' environment (an async pipeline, say) goes in ``FANOUT_IN_FLIGHT_ENV``."""
    return ()


FANOUT_IN_FLIGHT_ENV: dict[str, str] = {}


def _fanout(leaf_kind: str) -> Harness:
    return FanoutHarness(sleep=leaf_kind == "sleep")


def fanout_in_flight_harness(leaf_kind: str) -> Harness:
    harness = FanoutHarness(FANOUT_IN_FLIGHT_ENV, sleep=leaf_kind == "sleep")
    harness.name = "fanout-inflight"
    return harness


def families(regime: str, latency_ms: float, cores: int,
             in_flight: int = IN_FLIGHT) -> list[Family]:
    """Each family's candidates in ``regime``."""
    if regime == IN_FLIGHT_REGIME:
        return _in_flight_families(in_flight)
    # Prefork runs one call per child: the CPU count (Celery's default -c) when nothing waits,
    # 16 children when calls wait 20 ms (as the pools suite tries for fanout).
    prefork = cores if latency_ms <= 0 else 16
    celery = [WorkerConfig(cores, "threads", 32), WorkerConfig(cores, "threads", 8),
              WorkerConfig(1, "prefork", prefork), WorkerConfig(cores, "gevent", 100)]
    return [
        Family("fanout", _fanout, (FANOUT_THREADS,),
               why="fanout's default workers (one process per core x 32 threads), chosen by "
                   "the pools suite"),
        Family("celery", CeleryBaselineHarness,
               tuple(dataclasses.replace(c, **CELERY_DEFAULTS) for c in celery),
               CELERY_VARIATIONS,
               why="pools from Celery's Concurrency guide (prefork, threads, gevent); prefetch "
                   "multiplier 64 and bulk sending from its Optimizing and Canvas guides, then "
                   "the defaults and chunks as variations; -E as fanout sends events"),
        Family("dramatiq", DramatiqHarness,
               (WorkerConfig(cores, "threads", 8), WorkerConfig(cores, "threads", 32),
                WorkerConfig(cores, "gevent", 100)),
               why="Dramatiq's default worker (a process per core x 8 threads), more threads, "
                   "and its dramatiq-gevent launcher (Advanced Topics: for network-bound "
                   "actors)"),
    ]


def _split(in_flight: int, processes: int) -> int:
    return max(1, in_flight // processes)


def _in_flight_families(in_flight: int) -> list[Family]:
    def shapes(pool: str, **knobs: Any) -> tuple[WorkerConfig, ...]:
        return tuple(WorkerConfig(p, pool, _split(in_flight, p), **knobs) for p in (1, 2))

    def fanout_shapes() -> tuple[WorkerConfig, ...]:
        # The demo's stages are async: a process's items run together on its event loop, up
        # to --max-in-flight; threads only carry claimed batches (issue #20).
        return tuple(
            WorkerConfig(p, "threads", threads,
                         worker_args=("--max-in-flight", str(_split(in_flight, p))))
            for p, threads in ((2, 16), (2, 32), (1, 32)))

    out = [
        Family("fanout", _fanout, fanout_shapes(),
               why=f"fanout's async stages with --max-in-flight {in_flight} in all, on 1 or 2 "
                   "processes of 16 or 32 threads (the threads carry claimed batches)"),
    ]
    if fanout_in_flight_shapes(in_flight):
        out.append(Family("fanout-inflight", fanout_in_flight_harness,
                          fanout_in_flight_shapes(in_flight),
                          why="fanout's in-flight engine at the same bound"))
    out += [
        Family("celery", CeleryBaselineHarness, shapes("gevent", **CELERY_DEFAULTS),
               CELERY_VARIATIONS[:3],
               why=f"Celery's gevent pool, -c {in_flight} in all (its Concurrency guide's "
                   "command for I/O-bound work), on 1 or 2 worker processes; prefetch and "
                   "bulk sending as in the threads regime"),
        Family("dramatiq", DramatiqHarness, shapes("gevent"),
               why=f"dramatiq-gevent with {in_flight} greenlets in all (Advanced Topics), "
                   "on 1 or 2 processes"),
        Family("dramatiq-async", DramatiqHarness, shapes("async"),
               why=f"async actors (the AsyncIO middleware) on {in_flight} worker threads in "
                   "all: each thread waits for its coroutine, so threads bound the calls in "
                   "flight (Dramatiq's Cookbook)"),
    ]
    return out
