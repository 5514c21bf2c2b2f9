"""The harvest suite's contenders: how each one's workers start, show they are ready, and run
one harvest of a shape, checked.

- ``FanoutHarness``: fanout as a user runs it (``celery -A workers worker`` processes,
  ``start_run``, ledger wait), or its sleep-leaf pipeline;
- ``CeleryBaselineHarness``: the hand-written Celery fan-out (``benchmarks.celery_baseline``);
- ``DramatiqHarness``: the same shape on Dramatiq (``benchmarks.dramatiq_baseline``), on
  threads, under its gevent launcher, or as async actors.

``WorkerConfig`` is everything about a contender's workers that the harvest suite's sweep
(``benchmarks/sweep.py``) may choose: processes, pool, concurrency, and each library's own knobs.
"""

from __future__ import annotations

import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from benchmarks import baseline_common as common
from benchmarks import leaf
from benchmarks.core import BenchmarkError
from benchmarks.env import BenchEnv, python

END_DAY = "2026-01-31"
READY_TIMEOUT_S = 90.0
SLEEP_PIPELINE = "benchsleep"  # benchmarks/sleep_pipeline.py
SAMPLE_EVERY_S = 0.1
#: Dramatiq's gevent launcher, installed beside this interpreter by the dramatiq package.
DRAMATIQ_GEVENT = Path(python()).with_name("dramatiq-gevent")


@dataclass(frozen=True)
class Shape:
    accounts: int
    services: int
    days: int

    @property
    def total(self) -> int:
        return self.accounts * self.services * self.days

    @property
    def label(self) -> str:
        return f"{self.accounts}x{self.services}x{self.days}"



@dataclass(frozen=True)
class WorkerConfig:
    """How a contender's workers run. ``concurrency`` is per process: threads, greenlets,
    prefork children, or (pool ``async``: Dramatiq's async actors) the threads whose each waits
    for one coroutine. Either way it bounds the calls a process has in flight. The knobs a
    library does not have stay None.

    - ``prefetch``: Celery's ``--prefetch-multiplier`` (None: its default, 4); Dramatiq's
      ``dramatiq_queue_prefetch`` (None: its default, 2 x threads);
    - ``publish``: how the Celery baseline sends children (``each``, ``group``, ``chunks:N``:
      ``celery_baseline.publish_mode``);
    - ``events``: Celery's ``-E`` (task events; fanout sends them, for Flower);
    - ``worker_args``: more ``celery worker`` options for fanout's workers (where fanout's
      in-flight settings go).
    """

    processes: int
    pool: str
    concurrency: int
    prefetch: int | None = None
    publish: str | None = None
    events: bool | None = None
    worker_args: tuple[str, ...] = ()

    @property
    def in_flight(self) -> int:
        """Calls the workers can have in flight at once, all processes together: fanout's
        --max-in-flight where it is given (its async stages' items share a process's event
        loop), else one per thread, greenlet or child."""
        args = list(self.worker_args)
        if "--max-in-flight" in args:
            return self.processes * int(args[args.index("--max-in-flight") + 1])
        return self.processes * self.concurrency

    @property
    def label(self) -> str:
        parts = [f"{self.processes} proc x {self.pool} {self.concurrency}"]
        if self.prefetch is not None:
            parts.append(f"prefetch {self.prefetch}")
        if self.publish is not None:
            parts.append(self.publish)
        if self.events is not None:
            parts.append("-E" if self.events else "no -E")
        if self.worker_args:
            parts.append(" ".join(self.worker_args))
        return ", ".join(parts)

    @property
    def short_label(self) -> str:
        """``label`` for a table cell: ``2x threads 32 pf64 group -E``."""
        parts = [f"{self.processes}x {self.pool} {self.concurrency}"]
        if self.prefetch is not None:
            parts.append(f"pf{self.prefetch}")
        if self.publish is not None:
            parts.append(self.publish)
        if self.events is not None:
            parts.append("-E" if self.events else "no-E")
        parts += self.worker_args
        return " ".join(parts)


@dataclass
class RunOutcome:
    wall_s: float
    checks: dict[str, Any]
    #: (seconds since the trigger, leaves done) every SAMPLE_EVERY_S, read from Redis
    samples: list[tuple[float, int]] = field(default_factory=list)


class LeafSampler:
    """Reads a run's done-leaf count every ``SAMPLE_EVERY_S`` in a thread, from the trigger
    to the end (one small Redis read each: fanout's ledger counter, or a baseline's INCR
    counter)."""

    def __init__(self, count: Callable[[], int]) -> None:
        self.count = count
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            try:
                self.samples.append((round(time.perf_counter() - self._started, 3),
                                     self.count()))
            except Exception:  # a missed sample is no reason to fail a run
                continue

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join(2)
        return self.samples



class Harness(Protocol):
    name: str
    leaf: str

    def start(
        self, env: BenchEnv, config: WorkerConfig, suite_dir: Path
    ) -> list[subprocess.Popen[Any]]: ...

    def wait_ready(
        self, procs: Sequence[subprocess.Popen[Any]], suite_dir: Path, timeout_s: float
    ) -> None: ...

    def run(self, env: BenchEnv, shape: Shape, suite_dir: Path) -> RunOutcome: ...


def _run_timeout_s(shape: Shape) -> float:
    return max(120.0, shape.total / 50)


def _log_tail(suite_dir: Path, lines: int = 15) -> str:
    tails = []
    for log in sorted(suite_dir.glob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        tails.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(tails)


def _check_alive(procs: Sequence[subprocess.Popen[Any]], suite_dir: Path) -> None:
    for proc in procs:
        if proc.poll() is not None:
            raise BenchmarkError(
                f"worker {proc.pid} exited with {proc.returncode}:\n{_log_tail(suite_dir)}"
            )


def _wait_celery(
    app: Any, names: Sequence[str], procs: Sequence[subprocess.Popen[Any]], suite_dir: Path,
    timeout_s: float,
) -> None:
    """Until every named worker answers a remote-control ping."""
    deadline = time.monotonic() + timeout_s
    missing = set(names)
    while time.monotonic() < deadline:
        _check_alive(procs, suite_dir)
        # limit: return as soon as that many answered, instead of always waiting the timeout.
        for reply in app.control.ping(timeout=0.5, limit=len(missing)) or []:
            for hostname in reply:
                missing.discard(str(hostname).split("@", 1)[0])
        if not missing:
            return
    raise BenchmarkError(f"workers not ready after {timeout_s:.0f}s: {sorted(missing)}")


def _wait_counter(env: BenchEnv, tag: str, expected: int, timeout_s: float) -> int:
    """Until the baseline's completion counter reaches ``expected`` (polled every 5 ms);
    returns the count."""
    r = env.redis
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, failed = (int(v or 0) for v in r.mget(common.done_key(tag), common.failed_key(tag)))
        if failed:
            raise BenchmarkError(f"{failed} leaf task(s) failed in {tag}")
        if done >= expected:
            return done
        time.sleep(0.005)
    raise BenchmarkError(f"{tag}: timed out after {timeout_s:.0f}s")


def _verify(checks: dict[str, Any], wants: dict[str, tuple[Any, Any]]) -> None:
    for what, (got, want) in wants.items():
        checks[what] = got
        if got != want:
            raise BenchmarkError(f"{what} is {got!r}, expected {want!r}")



# -- contenders ---------------------------------------------------------------------------------


class FanoutHarness:
    """fanout's own workers. ``sleep=True``: its sleep-leaf pipeline (``benchsleep``, loaded
    through ``FANOUT_PIPELINES``) instead of the demo pipeline."""

    name = "fanout"

    def __init__(self, extra_env: dict[str, str] | None = None, *, sleep: bool = False) -> None:
        self.names: list[str] = []
        self.extra_env = dict(extra_env or {})
        self.sleep = sleep
        self.leaf = "sleep" if sleep else "fanout"
        self.pipeline = SLEEP_PIPELINE if sleep else "demo"
        if sleep:
            self.extra_env["FANOUT_PIPELINES"] = "benchmarks.sleep_pipeline"

    def start(
        self, env: BenchEnv, config: WorkerConfig, suite_dir: Path
    ) -> list[subprocess.Popen[Any]]:
        from producers.processes import start_worker

        _create_sink(suite_dir / "sink.db", "fanout")
        token = secrets.token_hex(3)
        self.names = [f"bench-fanout-{token}-{i}" for i in range(config.processes)]
        return [
            env.track(
                start_worker(
                    {**env.worker_env(suite_dir), **self.extra_env},
                    pool=config.pool, concurrency=config.concurrency,
                    name=f"{name}@%h", log_path=str(suite_dir / f"{name}.log"),
                    extra=config.worker_args,
                )
            )
            for name in self.names
        ]

    def wait_ready(
        self, procs: Sequence[subprocess.Popen[Any]], suite_dir: Path, timeout_s: float
    ) -> None:
        from workers.celery import app

        _wait_celery(app, self.names, procs, suite_dir, timeout_s)

    def run(self, env: BenchEnv, shape: Shape, suite_dir: Path) -> RunOutcome:
        from producers.trigger import start_run
        from workers.engine.services import services

        if self.sleep:
            import benchmarks.sleep_pipeline  # noqa: F401  (registers it in the driver too)

        params = {"days": shape.days, "end_day": END_DAY, "vendor_url": env.vendor_handle.url,
                  "http_retries": 0}
        ledger = services().ledger
        started = time.perf_counter()
        run_id = start_run(self.pipeline, params)
        from workers.keys import RunKeys

        counts = RunKeys.of(run_id).counts
        sampler = LeafSampler(lambda: int(env.redis.hget(counts, "metric_day:succeeded") or 0))
        status = ledger.view.wait(run_id, _run_timeout_s(shape))
        wall = time.perf_counter() - started
        samples = sampler.stop()
        snapshot = ledger.view.snapshot(run_id)
        if snapshot is None:
            raise BenchmarkError(f"run {run_id} vanished from the ledger")
        summary = snapshot.summary()
        leaves = summary["stages"].get("metric_day", {})
        checks: dict[str, Any] = {"run_id": run_id, "pipeline": self.pipeline,
                                  "ledger_wall_s": summary["wall_s"]}
        rows = 0 if self.sleep else shape.total
        wants: dict[str, tuple[Any, Any]] = {
            "status": (status, "succeeded"),
            "rows_written": (summary["rows_written"], rows),
            "metric_day_succeeded": (leaves.get("succeeded"), shape.total),
            "metric_day_failed": (leaves.get("failed"), 0),
        }
        if not self.sleep:
            wants["sink_rows"] = (common.sink_count(suite_dir / "sink.db", run_id), rows)
        _verify(checks, wants)
        return RunOutcome(wall, checks, samples)



class CeleryBaselineHarness:
    """The hand-written Celery fan-out, its workers running leaf kind ``leaf``: ``processes``
    worker instances, each ``--pool POOL --concurrency N``, with the config's prefetch
    multiplier, task events and way of publishing children."""

    name = "celery"

    def __init__(self, leaf_kind: str = "fanout") -> None:
        self.names: list[str] = []
        self.leaf = leaf_kind

    def start(
        self, env: BenchEnv, config: WorkerConfig, suite_dir: Path
    ) -> list[subprocess.Popen[Any]]:
        from benchmarks.celery_baseline import POOL_LIMIT_ENV, PUBLISH_ENV, QUEUE

        _create_sink(suite_dir / "baseline-sink.db", self.leaf)
        token = secrets.token_hex(3)
        self.names = [f"bench-celery-{token}-{i}" for i in range(config.processes)]
        worker_env = {**_baseline_env(env, suite_dir, self.leaf, config),
                      PUBLISH_ENV: config.publish or "each",
                      POOL_LIMIT_ENV: str(config.concurrency)}
        procs = []
        for name in self.names:
            cmd = [
                python(), "-m", "celery", "-A", "benchmarks.celery_baseline", "worker",
                "--pool", config.pool, "--concurrency", str(config.concurrency),
                "--loglevel", "WARNING", "--without-mingle", "--without-gossip",
                "--queues", QUEUE, "--hostname", f"{name}@%h",
            ]
            if config.events:
                cmd.append("-E")
            if config.prefetch is not None:
                cmd += ["--prefetch-multiplier", str(config.prefetch)]
            procs.append(env.spawn(cmd, worker_env, suite_dir / f"{name}.log"))
        return procs

    def wait_ready(
        self, procs: Sequence[subprocess.Popen[Any]], suite_dir: Path, timeout_s: float
    ) -> None:
        from benchmarks.celery_baseline import app

        _wait_celery(app, self.names, procs, suite_dir, timeout_s)

    def run(self, env: BenchEnv, shape: Shape, suite_dir: Path) -> RunOutcome:
        from benchmarks.celery_baseline import account

        return _run_baseline("celery", self.leaf, account.delay, env, shape, suite_dir)


class DramatiqHarness:
    """The Dramatiq baseline, its workers running leaf kind ``leaf``. Pool ``threads``:
    ``python -m dramatiq``; ``gevent``: Dramatiq's ``dramatiq-gevent`` launcher (greenlets
    for threads); ``async``: ``python -m dramatiq`` with the leaf as an async actor."""

    name = "dramatiq"
    POOLS = ("threads", "gevent", "async")

    def __init__(self, leaf_kind: str = "fanout") -> None:
        self.processes = 0
        self.leaf = leaf_kind

    def start(
        self, env: BenchEnv, config: WorkerConfig, suite_dir: Path
    ) -> list[subprocess.Popen[Any]]:
        from benchmarks.dramatiq_baseline import ASYNC_ENV

        if config.pool not in self.POOLS:
            raise BenchmarkError(f"dramatiq has no pool {config.pool!r}")
        self.processes = config.processes
        _create_sink(suite_dir / "baseline-sink.db", self.leaf)
        launcher = [str(DRAMATIQ_GEVENT)] if config.pool == "gevent" else ["-m", "dramatiq"]
        cmd = [
            python(), *launcher, "benchmarks.dramatiq_baseline",
            "--processes", str(config.processes), "--threads", str(config.concurrency),
        ]
        worker_env = _baseline_env(env, suite_dir, self.leaf, config)
        if config.pool == "async":
            worker_env[ASYNC_ENV] = "1"
        if config.prefetch is not None:
            worker_env["dramatiq_queue_prefetch"] = str(config.prefetch)
        return [env.spawn(cmd, worker_env, suite_dir / "dramatiq.log")]

    def wait_ready(
        self, procs: Sequence[subprocess.Popen[Any]], suite_dir: Path, timeout_s: float
    ) -> None:
        deadline = time.monotonic() + timeout_s
        log = suite_dir / "dramatiq.log"
        while time.monotonic() < deadline:
            _check_alive(procs, suite_dir)
            text = log.read_text(errors="replace") if log.exists() else ""
            if text.count("Worker process is ready for action") >= self.processes:
                return
            time.sleep(0.1)
        raise BenchmarkError(f"dramatiq not ready after {timeout_s:.0f}s")

    def run(self, env: BenchEnv, shape: Shape, suite_dir: Path) -> RunOutcome:
        from benchmarks.dramatiq_baseline import account

        return _run_baseline("dramatiq", self.leaf, account.send, env, shape, suite_dir)


def _create_sink(path: Path, leaf_kind: str) -> None:
    """Create the SQLite sink file, in WAL mode with its table, before any worker starts, for
    every contender alike (a sink that already exists, as in production). Worker processes
    that open a new file at the same instant race to switch it to WAL, and the loser fails
    with "database is locked" (``SqliteSink.__init__``); a fanout item that hits it is left
    pending and its run never ends. ``sleep`` baselines open no sink (fanout's engine opens
    its sink even for a sleep leaf that writes no rows, so fanout always gets one)."""
    if leaf_kind == "client":
        common.connect_sink(path).close()
    elif leaf_kind == "fanout":
        from workers.sinks.sqlite import SqliteSink

        SqliteSink(path).close()


#: Redis connections per pool in a baseline process, beyond one per thread or greenlet (the
#: consumer's, heartbeats, the completion counter's).
REDIS_HEADROOM = 32


def _baseline_env(
    env: BenchEnv, suite_dir: Path, leaf_kind: str, config: WorkerConfig
) -> dict[str, str]:
    return {**env.worker_env(suite_dir), leaf.LEAF_ENV: leaf_kind,
            common.REDIS_MAX_CONNECTIONS_ENV: str(config.concurrency + REDIS_HEADROOM)}


def _run_baseline(
    name: str, leaf_kind: str, send: Any, env: BenchEnv, shape: Shape, suite_dir: Path
) -> RunOutcome:
    """Send one message per account (``send``: the baseline's enqueue call), then wait for
    the baseline's completion counter and check its sink."""
    tag = f"{name}-{secrets.token_hex(4)}"
    url = env.vendor_handle.url
    started = time.perf_counter()
    sampler = LeafSampler(lambda: int(env.redis.get(common.done_key(tag)) or 0))
    for account_id in common.list_accounts(url):
        send(tag, url, account_id, END_DAY, shape.days)
    done = _wait_counter(env, tag, shape.total, _run_timeout_s(shape))
    wall = time.perf_counter() - started
    samples = sampler.stop()
    checks: dict[str, Any] = {"tag": tag, "leaf": leaf_kind, "leaves_done": done}
    if leaf_kind != "sleep":
        _verify(checks, {
            "sink_rows": (common.sink_count(suite_dir / "baseline-sink.db", tag), shape.total),
        })
    return RunOutcome(wall, checks, samples)

