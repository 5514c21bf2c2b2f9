"""Harvest throughput: metric-days (leaves) per second for accounts x services x days at 20 ms.

Contenders, each on the same Redis, vendor, machine and worker settings:
- fanout as a user runs it (``celery -A workers worker`` processes, ``start_run``, ledger wait);
- the hand-written Celery fan-out (``benchmarks.celery_baseline``), task events on;
- the same shape on Dramatiq (``benchmarks.dramatiq_baseline``);
- each baseline with three leaf kinds (``benchmarks/leaf.py``): fanout's own leaf code (its
  ``request_json`` and ``SqliteSink``: the equal-terms comparison), a shared ``httpx.Client`` +
  plain INSERT (the client's and sink's share), and a sleep-only leaf (framework cost alone),
  which fanout runs too (``benchmarks/sleep_pipeline.py``);
- a naive sequential loop (one thread, fanout's leaf code), sampled and extrapolated.

Repeats are interleaved: round 1 runs every contender once, A B C ..., then round 2, and so on,
so slow drifts of the machine's load hit every contender alike. Every timed run starts its own
workers on a flushed Redis, waits until they answer (Celery ping / Dramatiq's ready lines), runs
a tiny warm-up harvest, times the real one from trigger to the last leaf, and stops them.
A contender whose rows, ledger or vendor request count do not match the shape in any of its runs
reports no number.
"""

from __future__ import annotations

import secrets
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from benchmarks import baseline_common as common
from benchmarks import leaf
from benchmarks.core import (
    BenchmarkError,
    Context,
    SuiteResult,
    Table,
    fmt_rate,
)
from benchmarks.env import BenchEnv, cpu_seconds, machine_cpu_seconds, python, rss_bytes
from producers.processes import DEFAULT_CONCURRENCY, DEFAULT_POOL, default_processes

END_DAY = "2026-01-31"
LATENCY_MS = leaf.LATENCY_MS
WARMUP_SHAPE_ARGS = (2, 10, 2)
READY_TIMEOUT_S = 90.0
NAIVE_SAMPLE = 300
NAIVE_SAMPLE_QUICK = 50
HARVEST_REPEATS = 3  # the harvest suite's default --repeat
SLEEP_PIPELINE = "benchsleep"  # benchmarks/sleep_pipeline.py


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


WARMUP = Shape(*WARMUP_SHAPE_ARGS)
FULL_SHAPE = Shape(10, 50, 30)
QUICK_SHAPE = Shape(4, 25, 10)
POOLS_SHAPE = Shape(4, 50, 15)
POOLS_SHAPE_QUICK = Shape(4, 25, 2)


@dataclass(frozen=True)
class WorkerConfig:
    processes: int
    pool: str
    concurrency: int

    @property
    def label(self) -> str:
        return f"{self.processes} proc x {self.pool} {self.concurrency}"


# fanout's own defaults (`fanout worker`): one process per core, 32 threads each; every
# contender runs with the same processes x threads.
MAIN_CONFIG = WorkerConfig(default_processes(), DEFAULT_POOL, DEFAULT_CONCURRENCY)
POOL_CONFIGS = (
    WorkerConfig(1, "threads", 32),
    WorkerConfig(2, "threads", 16),  # async stages: fewer threads carry bigger batches
    WorkerConfig(2, "threads", 32),
    WorkerConfig(2, "threads", 64),
    WorkerConfig(1, "prefork", 16),
)

# The figures every run has, each summarised as median [min-max] over the runs.
SPREAD_FIGURES = ("rate", "wall_s", "worker_cpu_ms_per_item", "redis_cpu_ms_per_item",
                  "vendor_cpu_ms_per_item", "worker_rss_bytes", "leaf_phase_rate")
#: The leaf phase of a run: from this share of the leaves done to that one. Its rate leaves
#: out the start (the fan-out still making the first leaves) and the tail.
LEAF_PHASE = (0.2, 0.8)
SAMPLE_EVERY_S = 0.1


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


def thread_ceiling(config: WorkerConfig, latency_ms: float = LATENCY_MS) -> float | None:
    """Leaves per second that ``config``'s threads could run at most, each waiting the
    vendor's latency per call, whatever the framework around them; None at 0 ms, where only
    CPU bounds the rate."""
    if latency_ms <= 0:
        return None
    return config.processes * config.concurrency * 1000 / latency_ms


def _ceiling_note(config: WorkerConfig, ceiling: float | None) -> str:
    if ceiling is None:
        return " (no vendor latency: CPU alone bounds every contender)"
    return (f", against a ceiling of {ceiling:,.0f}/s for any contender "
            f"({config.processes * config.concurrency} threads / {LATENCY_MS:g} ms)")


def leaf_phase_rate(samples: Sequence[tuple[float, int]], total: int) -> float | None:
    """Leaves per second between LEAF_PHASE[0] and LEAF_PHASE[1] of ``total`` done, the
    instant of each mark interpolated between the two samples around it (the count is 0 at
    the trigger); None when a mark was never reached."""
    marks = [share * total for share in LEAF_PHASE]
    times = [_crossing(samples, mark) for mark in marks]
    if times[0] is None or times[1] is None or times[1] <= times[0]:
        return None
    return round((marks[1] - marks[0]) / (times[1] - times[0]), 1)


def _crossing(samples: Sequence[tuple[float, int]], mark: float) -> float | None:
    before = (0.0, 0)
    for at, count in samples:
        if count >= mark:
            if count == before[1]:
                return at
            return before[0] + (mark - before[1]) / (count - before[1]) * (at - before[0])
        before = (at, count)
    return None


@dataclass
class Measurement:
    contender: str
    leaf: str  # a key of leaf.KINDS
    shape: Shape
    config: WorkerConfig | None
    items: int
    wall_s: float  # median over the runs
    rate: float  # metric-days per second, median over the runs
    runs: list[dict[str, Any]] = field(default_factory=list)  # every run, in the order run
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  # median, min, max
    worker_rss_bytes: int | None = None  # median
    cores_used: dict[str, float] = field(default_factory=dict)  # of the median-rate run
    worker_cpu_ms_per_item: float | None = None  # median
    redis_cpu_ms_per_item: float | None = None  # median
    vendor_cpu_ms_per_item: float | None = None  # median
    checks: dict[str, Any] = field(default_factory=dict)  # of the median-rate run
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = {**asdict(self.shape), "total": self.shape.total}
        return data


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
    """The hand-written Celery fan-out, its workers running leaf kind ``leaf``."""

    name = "celery"

    def __init__(self, leaf_kind: str = "fanout") -> None:
        self.names: list[str] = []
        self.leaf = leaf_kind

    def start(
        self, env: BenchEnv, config: WorkerConfig, suite_dir: Path
    ) -> list[subprocess.Popen[Any]]:
        from benchmarks.celery_baseline import QUEUE

        _create_sink(suite_dir / "baseline-sink.db", self.leaf)
        token = secrets.token_hex(3)
        self.names = [f"bench-celery-{token}-{i}" for i in range(config.processes)]
        procs = []
        for name in self.names:
            cmd = [
                python(), "-m", "celery", "-A", "benchmarks.celery_baseline", "worker",
                "--pool", config.pool, "--concurrency", str(config.concurrency),
                "-E", "--loglevel", "WARNING", "--without-mingle", "--without-gossip",
                "--queues", QUEUE, "--hostname", f"{name}@%h",
            ]
            procs.append(env.spawn(cmd, _baseline_env(env, suite_dir, self.leaf),
                                   suite_dir / f"{name}.log"))
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
    """The Dramatiq baseline, its workers running leaf kind ``leaf``."""

    name = "dramatiq"

    def __init__(self, leaf_kind: str = "fanout") -> None:
        self.processes = 0
        self.leaf = leaf_kind

    def start(
        self, env: BenchEnv, config: WorkerConfig, suite_dir: Path
    ) -> list[subprocess.Popen[Any]]:
        if config.pool != "threads":
            raise BenchmarkError("dramatiq runs threads only")
        self.processes = config.processes
        _create_sink(suite_dir / "baseline-sink.db", self.leaf)
        cmd = [
            python(), "-m", "dramatiq", "benchmarks.dramatiq_baseline",
            "--processes", str(config.processes), "--threads", str(config.concurrency),
        ]
        return [env.spawn(cmd, _baseline_env(env, suite_dir, self.leaf),
                          suite_dir / "dramatiq.log")]

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


def _baseline_env(env: BenchEnv, suite_dir: Path, leaf_kind: str) -> dict[str, str]:
    return {**env.worker_env(suite_dir), leaf.LEAF_ENV: leaf_kind}


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


@dataclass(frozen=True)
class Contender:
    """One row of the table: a harness factory (a fresh harness per run; None: the naive
    loop), its leaf kind, the worker settings, and the contender its ratio compares with."""

    name: str
    leaf: str
    make: Callable[[], Harness] | None
    config: WorkerConfig | None
    reference: str = "fanout"


def harvest_contenders(config: WorkerConfig) -> list[Contender]:
    """The harvest suite's contenders, in the order each round runs them."""
    return [
        Contender("fanout", "fanout", FanoutHarness, config),
        Contender("celery", "fanout", lambda: CeleryBaselineHarness("fanout"), config),
        Contender("dramatiq", "fanout", lambda: DramatiqHarness("fanout"), config),
        Contender("celery-client", "client", lambda: CeleryBaselineHarness("client"), config),
        Contender("dramatiq-client", "client", lambda: DramatiqHarness("client"), config),
        Contender("fanout-sleep", "sleep", lambda: FanoutHarness(sleep=True), config,
                  "fanout-sleep"),
        Contender("celery-sleep", "sleep", lambda: CeleryBaselineHarness("sleep"), config,
                  "fanout-sleep"),
        Contender("dramatiq-sleep", "sleep", lambda: DramatiqHarness("sleep"), config,
                  "fanout-sleep"),
        Contender("naive", "fanout", None, None),
    ]


# -- measuring ----------------------------------------------------------------------------------


def measure_once(
    ctx: Context, harness: Harness, shape: Shape, config: WorkerConfig, *, label: str = ""
) -> dict[str, Any]:
    """One timed run on fresh workers: flush Redis, start the workers, wait until they answer,
    warm up, time a harvest of ``shape``, stop the workers. Returns the run's figures."""
    env = ctx.env
    vendor = env.vendor_handle
    suite_dir = env.suite_dir(f"{label or harness.name}-{secrets.token_hex(3)}")
    env.flush()
    procs = harness.start(env, config, suite_dir)
    try:
        harness.wait_ready(procs, suite_dir, READY_TIMEOUT_S)
        vendor.configure(accounts=WARMUP.accounts, services=WARMUP.services)
        harness.run(env, WARMUP, suite_dir)
        vendor.configure(accounts=shape.accounts, services=shape.services)
        pids = [p.pid for p in procs]
        vendor.reset()
        cpu_before = _cpu(env, pids)
        outcome = harness.run(env, shape, suite_dir)
        cpu_after = _cpu(env, pids)
        rss = rss_bytes(pids)
    finally:
        env.stop_processes(procs)
    requests = vendor.metric_requests()
    outcome.checks["vendor_metric_requests"] = requests
    if harness.leaf == "sleep":
        if requests:
            raise BenchmarkError(f"the vendor served {requests} metric requests to a "
                                 "sleep-only leaf")
    elif requests < shape.total:
        raise BenchmarkError(f"the vendor served {requests} metric requests, "
                             f"fewer than the {shape.total} metric-days")
    return _run_figures(shape.total, outcome, cpu_before, cpu_after, rss)


def _run_figures(
    items: int, outcome: RunOutcome, before: dict[str, float], after: dict[str, float],
    rss: int | None,
) -> dict[str, Any]:
    def ms_per_item(key: str) -> float:
        return round((after[key] - before[key]) * 1000 / items, 3)

    return {
        "wall_s": round(outcome.wall_s, 3),
        "rate": round(items / outcome.wall_s, 1),
        "leaf_phase_rate": leaf_phase_rate(outcome.samples, items),
        "samples": outcome.samples,
        "worker_cpu_ms_per_item": ms_per_item("workers"),
        "redis_cpu_ms_per_item": ms_per_item("redis"),
        "vendor_cpu_ms_per_item": ms_per_item("vendor"),
        "worker_rss_bytes": rss,
        "cores_used": _per_wall(before, after, outcome.wall_s),
        "checks": outcome.checks,
    }


def run_interleaved(
    ctx: Context, contenders: Sequence[Contender], shape: Shape, repeats: int, *,
    label: str = "", naive_sample: int = NAIVE_SAMPLE,
) -> tuple[dict[str, Measurement], dict[str, str], list[tuple[int, str]]]:
    """``repeats`` rounds, each running every contender once in the given order (A B C A B C
    ...). Returns the measurements of the contenders whose every run did the work, the errors
    of the others (a failed contender is not run again), and the order the runs went in."""
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in contenders}
    errors: dict[str, str] = {}
    order: list[tuple[int, str]] = []
    for round_no in range(1, repeats + 1):
        ctx.log(f"  round {round_no}/{repeats}: shape {shape.label} = {shape.total:,} "
                "metric-days")
        for contender in contenders:
            if contender.name in errors:
                continue
            try:
                if contender.make is None:
                    run = measure_naive_once(ctx, shape, naive_sample)
                else:
                    assert contender.config is not None
                    run = measure_once(ctx, contender.make(), shape, contender.config,
                                       label=label or contender.name)
            except Exception as exc:
                errors[contender.name] = f"{type(exc).__name__}: {exc}"
                ctx.log(f"    [red]{contender.name} failed[/red]: {exc}")
                continue
            run["round"] = round_no
            runs[contender.name].append(run)
            order.append((round_no, contender.name))
            ctx.log(f"    {contender.name:<16} {run['rate']:>7,.0f} metric-days/s "
                    f"({run['wall_s']:.2f} s); CPU ms/metric-day: workers "
                    f"{_num(run['worker_cpu_ms_per_item'])}, redis "
                    f"{_num(run['redis_cpu_ms_per_item'])}, vendor "
                    f"{_num(run['vendor_cpu_ms_per_item'])}; other+steal "
                    f"{_noise(run['cores_used']):.2f} cores")
    measurements = {
        c.name: _aggregate(c, shape, runs[c.name])
        for c in contenders if c.name not in errors and runs[c.name]
    }
    return measurements, errors, order


def measure(
    ctx: Context, harness: Harness, shape: Shape, config: WorkerConfig, *, repeats: int = 1,
    label: str = "",
) -> Measurement:
    """``repeats`` timed runs of one harness (each on fresh workers); raises when one failed."""
    contender = Contender(harness.name, harness.leaf, lambda: harness, config)
    measurements, errors, _ = run_interleaved(ctx, [contender], shape, repeats, label=label)
    if errors:
        raise BenchmarkError(errors[harness.name])
    return measurements[harness.name]


def _spread(values: Sequence[float | None]) -> dict[str, float] | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"median": round(statistics.median(present), 3), "min": min(present),
            "max": max(present), "runs": len(present)}


def _aggregate(contender: Contender, shape: Shape, runs: list[dict[str, Any]]) -> Measurement:
    stats = {k: s for k in SPREAD_FIGURES if (s := _spread([r.get(k) for r in runs]))}
    middle = _median_run(runs)

    def median(key: str) -> float | None:
        return stats[key]["median"] if key in stats else None

    rss = median("worker_rss_bytes")
    return Measurement(
        contender=contender.name, leaf=contender.leaf, shape=shape, config=contender.config,
        items=shape.total, wall_s=float(stats["wall_s"]["median"]),
        rate=float(stats["rate"]["median"]), runs=runs, stats=stats,
        worker_rss_bytes=int(rss) if rss is not None else None,
        cores_used=middle["cores_used"], checks=middle["checks"],
        worker_cpu_ms_per_item=median("worker_cpu_ms_per_item"),
        redis_cpu_ms_per_item=median("redis_cpu_ms_per_item"),
        vendor_cpu_ms_per_item=median("vendor_cpu_ms_per_item"),
        note=middle.get("note", ""),
    )


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: float(r["rate"]))
    return ordered[(len(ordered) - 1) // 2]


def _cpu(env: BenchEnv, worker_pids: list[int]) -> dict[str, float]:
    """CPU seconds so far: ours by process group, and what the rest of the machine used
    (``other``: busy time not ours; ``steal``: taken by the hypervisor) — the noise gauge."""
    ours = {
        "workers": cpu_seconds(worker_pids),
        "vendor": cpu_seconds([env.vendor_handle.pid]),
        "redis": cpu_seconds([env.redis_pid]),
        "driver": time.process_time(),
    }
    machine = machine_cpu_seconds()
    return {**ours, "other": machine["busy"] - sum(ours.values()), "steal": machine["steal"]}


def _per_wall(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """Cores used: CPU seconds / wall seconds. ``other`` is a difference of counters read at
    slightly different instants, so it can dip a hair below zero: clamp it."""
    return {k: round(max(0.0, (after[k] - before[k]) / wall_s), 2) for k in before}


def measure_naive_once(ctx: Context, shape: Shape, sample: int) -> dict[str, Any]:
    """One thread in this process doing fanout's leaf code (``leaf.fetch_record`` on
    ``request_json``'s per-thread transport, ``SqliteSink.write`` of one row) per metric-day;
    ``sample`` of them, timed and extrapolated to the shape, listing requests included. Its
    worker CPU is this process's CPU during the sample (it is the worker)."""
    from workers.sinks.sqlite import SqliteSink

    env = ctx.env
    vendor = env.vendor_handle
    vendor.configure(accounts=shape.accounts, services=shape.services)
    suite_dir = env.suite_dir(f"naive-{secrets.token_hex(3)}")
    sink_path = suite_dir / "naive.db"
    sink = SqliteSink(sink_path)  # this one-thread "process"'s sink
    tag = f"naive-{secrets.token_hex(4)}"
    url = vendor.url
    accounts = [a["id"] for a in leaf.get_json(f"{url}/accounts")["accounts"]]
    items: list[dict[str, str]] = []
    for account_id in accounts:
        for svc in leaf.list_services(url, account_id):
            items += [{**svc, "day": d} for d in common.metric_days(END_DAY, shape.days)]
        if len(items) >= sample:
            break
    items = items[:sample]
    vendor.reset()
    before = {"workers": time.process_time(), "vendor": cpu_seconds([vendor.pid]),
              "redis": cpu_seconds([env.redis_pid])}
    machine_before = machine_cpu_seconds()
    started = time.perf_counter()
    for item in items:
        sink.write([leaf.fetch_record(url, item)], tag)
    elapsed = time.perf_counter() - started
    after = {"workers": time.process_time(), "vendor": cpu_seconds([vendor.pid]),
             "redis": cpu_seconds([env.redis_pid])}
    machine_after = machine_cpu_seconds()
    sink.close()
    checks: dict[str, Any] = {"sample": len(items), "leaf": "fanout"}
    _verify(checks, {
        "sink_rows": (common.sink_count(sink_path, tag), len(items)),
        "vendor_metric_requests": (vendor.metric_requests(), len(items)),
    })
    page_size = int(vendor.configure()["page_size"])
    listing_requests = 1 + shape.accounts * -(-shape.services // page_size)
    projected_wall = (shape.total + listing_requests) * elapsed / len(items)
    ours = sum(after[k] - before[k] for k in after)
    cores = {k: round(max(0.0, (after[k] - before[k]) / elapsed), 2) for k in after}
    cores["other"] = round(max(0.0, (machine_after["busy"] - machine_before["busy"] - ours)
                               / elapsed), 2)
    cores["steal"] = round((machine_after["steal"] - machine_before["steal"]) / elapsed, 2)

    def ms_per_item(key: str) -> float:
        return round((after[key] - before[key]) * 1000 / len(items), 3)

    return {
        "wall_s": round(projected_wall, 2),
        "rate": round(shape.total / projected_wall, 1),
        "sample": len(items), "sample_wall_s": round(elapsed, 3),
        "sample_rate": round(len(items) / elapsed, 1),
        "worker_cpu_ms_per_item": ms_per_item("workers"),
        "redis_cpu_ms_per_item": None,
        "vendor_cpu_ms_per_item": ms_per_item("vendor"),
        "worker_rss_bytes": None,
        "cores_used": cores,
        "checks": checks,
        "note": f"1 thread; {len(items)} sampled, extrapolated "
                f"(incl. {listing_requests} listing requests)",
    }


# -- suites -------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _noise(cores: dict[str, float]) -> float:
    return cores.get("other", 0.0) + cores.get("steal", 0.0)


def fmt_spread(stats: dict[str, dict[str, float]], key: str, fmt: Callable[[float], str]) -> str:
    """``median [min-max]`` (a lone run: the value alone); ``-`` when there is none."""
    s = stats.get(key)
    if s is None:
        return "-"
    if s["runs"] < 2:
        return fmt(s["median"])
    return f"{fmt(s['median'])} [{fmt(s['min'])}-{fmt(s['max'])}]"


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f}"


def _ratios(
    contenders: Sequence[Contender], measurements: dict[str, Measurement]
) -> tuple[dict[str, float | None], dict[str, list[float]]]:
    """The reference's median rate / each contender's (``fanout/celery``...), and the same per
    round from the runs of that round (interleaving pairs them in time)."""
    ratios: dict[str, float | None] = {}
    per_round: dict[str, list[float]] = {}
    for c in contenders:
        if c.name == c.reference:
            continue
        key = f"{c.reference}/{c.name}"
        ref, other = measurements.get(c.reference), measurements.get(c.name)
        ratios[key] = round(ref.rate / other.rate, 2) if ref and other and other.rate else None
        if ref and other:
            by_round = {r["round"]: r["rate"] for r in ref.runs}
            per_round[key] = [round(by_round[r["round"]] / r["rate"], 2)
                              for r in other.runs if r["round"] in by_round and r["rate"]]
    return ratios, per_round


def harvest(ctx: Context) -> SuiteResult:
    shape = QUICK_SHAPE if ctx.quick else FULL_SHAPE
    repeats = ctx.repeats_or(HARVEST_REPEATS)
    config = MAIN_CONFIG
    sample = NAIVE_SAMPLE_QUICK if ctx.quick else NAIVE_SAMPLE
    contenders = harvest_contenders(config)
    result = SuiteResult("harvest", settings={
        "shape": {**asdict(shape), "total": shape.total}, "latency_ms": LATENCY_MS,
        "processes": config.processes, "pool": config.pool, "concurrency": config.concurrency,
        "dramatiq": {"processes": config.processes, "threads": config.concurrency},
        "repeats": repeats, "interleaved": True, "end_day": END_DAY, "http_retries": 0,
        "warmup_shape": asdict(WARMUP), "celery_task_events": True,
        "naive_sample": sample, "sleep_leaf_s": leaf.SLEEP_S,
        "contenders": {c.name: {"leaf": c.leaf, "leaf_work": leaf.KINDS[c.leaf],
                                "ratio_against": c.reference} for c in contenders},
    })
    ctx.log(f"  {len(contenders)} contenders x {repeats} round(s), interleaved; workers "
            f"{config.label}")
    measurements, errors, order = run_interleaved(ctx, contenders, shape, repeats,
                                                  naive_sample=sample)
    result.errors += [f"{name}: {error}" for name, error in errors.items()]
    ratios, per_round = _ratios(contenders, measurements)

    def medians(attr: str) -> dict[str, Any]:
        return {k: getattr(m, attr) for k, m in measurements.items()
                if getattr(m, attr) is not None}

    ceiling = thread_ceiling(config)
    result.figures = {
        "metric_days_per_s": medians("rate"),
        "leaf_phase_per_s": {k: m.stats["leaf_phase_rate"]["median"]
                             for k, m in measurements.items() if "leaf_phase_rate" in m.stats},
        "thread_ceiling_per_s": ceiling,
        "ratios": ratios,
        "ratios_per_round": per_round,
        "worker_cpu_ms_per_metric_day": medians("worker_cpu_ms_per_item"),
        "redis_cpu_ms_per_metric_day": medians("redis_cpu_ms_per_item"),
        "vendor_cpu_ms_per_metric_day": medians("vendor_cpu_ms_per_item"),
        "worker_rss_bytes": medians("worker_rss_bytes"),
        "spread": {k: m.stats for k, m in measurements.items()},
        "order": [f"{round_no}:{name}" for round_no, name in order],
        "failed": errors,
        "measurements": {k: m.as_json() for k, m in measurements.items()},
    }
    leaf_labels = {"fanout": "fanout's", "client": "client+INSERT",
                   "sleep": f"sleep {leaf.SLEEP_S * 1000:.0f} ms"}
    table = Table(
        f"Harvest throughput: {shape.label} = {shape.total:,} metric-days, "
        f"{LATENCY_MS:g} ms vendor latency, {config.label} "
        f"(Dramatiq {config.processes} processes x {config.concurrency} threads)",
        ["contender", "leaf code", "metric-days/s", "leaf phase /s", "fanout / this",
         "worker CPU ms / leaf", "Redis CPU ms / leaf", "vendor CPU ms / leaf",
         "worker RSS MiB", "other+steal cores"],
        caption=f"median [min-max] of {repeats} interleaved round(s) (each run on fresh "
                f"workers); leaf phase = the rate from {LEAF_PHASE[0]:.0%} to "
                f"{LEAF_PHASE[1]:.0%} of the leaves done{_ceiling_note(config, ceiling)}; "
                "fanout / this = ratio of medians, against fanout-sleep for the "
                "sleep rows; leaf code: fanout's = workers.http.request_json + SqliteSink, "
                "client+INSERT = shared httpx.Client + plain INSERT; naive: 1 thread, sampled "
                f"and extrapolated, its own CPU as worker CPU; machine: {ctx.cpu_count} cores",
    )
    for c in contenders:
        m = measurements.get(c.name)
        if m is None:
            table.rows.append([c.name, leaf_labels[c.leaf], "FAILED", "-", "-", "-", "-", "-",
                               "-", "-"])
            continue
        ratio = 1.0 if c.name == c.reference else ratios.get(f"{c.reference}/{c.name}")
        noise = _spread([_noise(r["cores_used"]) for r in m.runs])
        table.rows.append([
            c.name, leaf_labels[c.leaf],
            fmt_spread(m.stats, "rate", fmt_rate), fmt_spread(m.stats, "leaf_phase_rate", fmt_rate),
            "-" if ratio is None else f"{ratio:.2f}x",
            fmt_spread(m.stats, "worker_cpu_ms_per_item", _ms),
            fmt_spread(m.stats, "redis_cpu_ms_per_item", _ms),
            fmt_spread(m.stats, "vendor_cpu_ms_per_item", _ms),
            fmt_spread(m.stats, "worker_rss_bytes", _mib),
            fmt_spread({"n": noise}, "n", _ms) if noise else "-",
        ])
    result.tables.append(table)
    return result


def pools(ctx: Context) -> SuiteResult:
    shape = POOLS_SHAPE_QUICK if ctx.quick else POOLS_SHAPE
    repeats = ctx.repeats_or(1)
    result = SuiteResult("pools", settings={
        "shape": {**asdict(shape), "total": shape.total}, "latency_ms": LATENCY_MS,
        "configs": [asdict(c) for c in POOL_CONFIGS], "repeats": repeats, "interleaved": True,
        "skipped_configs": {"gevent": "gevent is not installed"},
    })
    contenders = [Contender(c.label, "fanout", FanoutHarness, c) for c in POOL_CONFIGS]
    by_label, errors, _ = run_interleaved(ctx, contenders, shape, repeats, label="pools")
    result.errors += [f"{name}: {error}" for name, error in errors.items()]
    measurements = list(by_label.values())
    best = max(measurements, key=lambda m: m.rate, default=None)
    result.figures = {
        "metric_days_per_s": {m.contender: m.rate for m in measurements},
        "best": best.contender if best else None,
        "measurements": [m.as_json() for m in measurements],
    }
    table = Table(
        f"fanout pool settings: {shape.label} = {shape.total:,} metric-days on "
        f"{ctx.cpu_count} cores",
        ["workers", "metric-days/s", "vs best", "worker CPU ms / leaf", "Redis CPU ms / leaf",
         "worker RSS MiB", "other+steal cores"],
        caption=f"gevent: skipped (not installed); median [min-max] of {repeats} interleaved "
                "round(s)",
    )
    for m in measurements:
        noise = _spread([_noise(r["cores_used"]) for r in m.runs])
        table.rows.append([
            m.contender + ("  (best)" if m is best else ""),
            fmt_spread(m.stats, "rate", fmt_rate),
            f"{m.rate / best.rate:.2f}x" if best else "-",
            fmt_spread(m.stats, "worker_cpu_ms_per_item", _ms),
            fmt_spread(m.stats, "redis_cpu_ms_per_item", _ms),
            fmt_spread(m.stats, "worker_rss_bytes", _mib),
            fmt_spread({"n": noise}, "n", _ms) if noise else "-",
        ])
    result.tables.append(table)
    return result
