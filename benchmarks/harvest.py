"""Harvest throughput: metric-days per second for accounts x services x days at 20 ms latency.

Contenders, each on the same Redis, vendor, machine and worker settings, one after another:
- fanout as a user runs it (``celery -A workers worker`` processes, ``start_run``, ledger wait);
- the hand-written Celery fan-out (``benchmarks.celery_baseline``), task events on;
- the same shape on Dramatiq (``benchmarks.dramatiq_baseline``);
- a naive sequential loop (one thread, one client), sampled and extrapolated.

Every measurement starts its workers, waits until they answer (Celery ping / Dramatiq's ready
lines), runs a tiny warm-up harvest, then times the real one from trigger to the last leaf.
A contender whose rows, ledger or vendor request count do not match the shape reports no number.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from benchmarks import baseline_common as common
from benchmarks.core import (
    BenchmarkError,
    Context,
    SuiteResult,
    Table,
    fmt_mib,
    fmt_rate,
    fmt_ratio,
)
from benchmarks.env import BenchEnv, cpu_seconds, machine_cpu_seconds, python, rss_bytes
from producers.processes import DEFAULT_CONCURRENCY, DEFAULT_POOL, default_processes

END_DAY = "2026-01-31"
LATENCY_MS = 20.0
WARMUP_SHAPE_ARGS = (2, 10, 2)
READY_TIMEOUT_S = 90.0
NAIVE_SAMPLE = 300
NAIVE_SAMPLE_QUICK = 50


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


# fanout's own defaults (`fanout worker`): one process per core, 64 threads each; every
# contender runs with the same processes x threads.
MAIN_CONFIG = WorkerConfig(default_processes(), DEFAULT_POOL, DEFAULT_CONCURRENCY)
POOL_CONFIGS = (
    WorkerConfig(1, "threads", 32),
    WorkerConfig(2, "threads", 32),
    WorkerConfig(2, "threads", 64),
    WorkerConfig(1, "prefork", 16),
)


@dataclass
class RunOutcome:
    wall_s: float
    checks: dict[str, Any]


@dataclass
class Measurement:
    contender: str
    shape: Shape
    config: WorkerConfig | None
    items: int
    wall_s: float  # median over the repeats
    rate: float  # metric-days per second, median over the repeats
    runs: list[dict[str, Any]] = field(default_factory=list)
    worker_rss_bytes: int | None = None
    cores_used: dict[str, float] = field(default_factory=dict)  # CPU seconds / wall seconds
    worker_cpu_ms_per_item: float | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = {**asdict(self.shape), "total": self.shape.total}
        return data


class Harness(Protocol):
    name: str

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


def _wait_counter(env: BenchEnv, tag: str, expected: int, timeout_s: float) -> None:
    """Until the baseline's completion counter reaches ``expected`` (polled every 5 ms)."""
    r = env.redis
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, failed = r.mget(common.done_key(tag), common.failed_key(tag))
        if failed:
            raise BenchmarkError(f"{int(failed)} leaf task(s) failed in {tag}")
        if int(done or 0) >= expected:
            return
        time.sleep(0.005)
    raise BenchmarkError(f"{tag}: timed out after {timeout_s:.0f}s")


def _verify(checks: dict[str, Any], wants: dict[str, tuple[Any, Any]]) -> None:
    for what, (got, want) in wants.items():
        checks[what] = got
        if got != want:
            raise BenchmarkError(f"{what} is {got!r}, expected {want!r}")


# -- contenders ---------------------------------------------------------------------------------


class FanoutHarness:
    name = "fanout"

    def __init__(self, extra_env: dict[str, str] | None = None) -> None:
        self.names: list[str] = []
        self.extra_env = extra_env or {}

    def start(
        self, env: BenchEnv, config: WorkerConfig, suite_dir: Path
    ) -> list[subprocess.Popen[Any]]:
        from producers.processes import start_worker

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

        params = {"days": shape.days, "end_day": END_DAY, "vendor_url": env.vendor_handle.url,
                  "http_retries": 0}
        ledger = services().ledger
        started = time.perf_counter()
        run_id = start_run("demo", params)
        status = ledger.wait(run_id, _run_timeout_s(shape))
        wall = time.perf_counter() - started
        snapshot = ledger.snapshot(run_id)
        if snapshot is None:
            raise BenchmarkError(f"run {run_id} vanished from the ledger")
        summary = snapshot.summary()
        leaf = summary["stages"].get("metric_day", {})
        checks: dict[str, Any] = {"run_id": run_id, "ledger_wall_s": summary["wall_s"]}
        _verify(checks, {
            "status": (status, "succeeded"),
            "rows_written": (summary["rows_written"], shape.total),
            "metric_day_succeeded": (leaf.get("succeeded"), shape.total),
            "metric_day_failed": (leaf.get("failed"), 0),
            "sink_rows": (common.sink_count(suite_dir / "sink.db", run_id), shape.total),
        })
        return RunOutcome(wall, checks)


class CeleryBaselineHarness:
    name = "celery"

    def __init__(self) -> None:
        self.names: list[str] = []

    def start(
        self, env: BenchEnv, config: WorkerConfig, suite_dir: Path
    ) -> list[subprocess.Popen[Any]]:
        from benchmarks.celery_baseline import QUEUE

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
            procs.append(env.spawn(cmd, env.worker_env(suite_dir), suite_dir / f"{name}.log"))
        return procs

    def wait_ready(
        self, procs: Sequence[subprocess.Popen[Any]], suite_dir: Path, timeout_s: float
    ) -> None:
        from benchmarks.celery_baseline import app

        _wait_celery(app, self.names, procs, suite_dir, timeout_s)

    def run(self, env: BenchEnv, shape: Shape, suite_dir: Path) -> RunOutcome:
        from benchmarks.celery_baseline import account

        return _run_baseline("celery", account.delay, env, shape, suite_dir)


class DramatiqHarness:
    name = "dramatiq"

    def __init__(self) -> None:
        self.processes = 0

    def start(
        self, env: BenchEnv, config: WorkerConfig, suite_dir: Path
    ) -> list[subprocess.Popen[Any]]:
        if config.pool != "threads":
            raise BenchmarkError("dramatiq runs threads only")
        self.processes = config.processes
        cmd = [
            python(), "-m", "dramatiq", "benchmarks.dramatiq_baseline",
            "--processes", str(config.processes), "--threads", str(config.concurrency),
        ]
        return [env.spawn(cmd, env.worker_env(suite_dir), suite_dir / "dramatiq.log")]

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

        return _run_baseline("dramatiq", account.send, env, shape, suite_dir)


def _run_baseline(
    name: str, send: Any, env: BenchEnv, shape: Shape, suite_dir: Path
) -> RunOutcome:
    """Send one message per account (``send``: the baseline's enqueue call), then wait for
    the baseline's completion counter and check its sink."""
    tag = f"{name}-{secrets.token_hex(4)}"
    url = env.vendor_handle.url
    started = time.perf_counter()
    for account_id in common.list_accounts(url):
        send(tag, url, account_id, END_DAY, shape.days)
    _wait_counter(env, tag, shape.total, _run_timeout_s(shape))
    wall = time.perf_counter() - started
    checks: dict[str, Any] = {"tag": tag}
    _verify(checks, {
        "sink_rows": (common.sink_count(suite_dir / "baseline-sink.db", tag), shape.total),
    })
    return RunOutcome(wall, checks)


# -- measuring ----------------------------------------------------------------------------------


def measure(
    ctx: Context, harness: Harness, shape: Shape, config: WorkerConfig, *, repeats: int = 1,
    label: str = "",
) -> Measurement:
    """Start the workers, warm up, time ``repeats`` harvests of ``shape``, stop the workers."""
    env = ctx.env
    vendor = env.vendor_handle
    suite_dir = env.suite_dir(f"{label or harness.name}-{secrets.token_hex(3)}")
    env.flush()
    ctx.log(f"  {harness.name}: {config.label}, shape {shape.label} = {shape.total:,} "
            f"metric-days, {repeats} run(s)")
    procs = harness.start(env, config, suite_dir)
    try:
        harness.wait_ready(procs, suite_dir, READY_TIMEOUT_S)
        vendor.configure(accounts=WARMUP.accounts, services=WARMUP.services)
        harness.run(env, WARMUP, suite_dir)
        vendor.configure(accounts=shape.accounts, services=shape.services)
        pids = [p.pid for p in procs]
        runs: list[dict[str, Any]] = []
        for _ in range(repeats):
            vendor.reset()
            cpu_before = _cpu(env, pids)
            outcome = harness.run(env, shape, suite_dir)
            cpu_after = _cpu(env, pids)
            requests = vendor.metric_requests()
            outcome.checks["vendor_metric_requests"] = requests
            if requests < shape.total:
                raise BenchmarkError(f"the vendor served {requests} metric requests, "
                                     f"fewer than the {shape.total} metric-days")
            runs.append({
                "wall_s": round(outcome.wall_s, 3),
                "rate": round(shape.total / outcome.wall_s, 1),
                "worker_cpu_ms_per_item": round(
                    (cpu_after["workers"] - cpu_before["workers"]) * 1000 / shape.total, 3
                ),
                "cores_used": _per_wall(cpu_before, cpu_after, outcome.wall_s),
                "checks": outcome.checks,
            })
            ctx.log(f"    {shape.total / outcome.wall_s:,.0f} metric-days/s "
                    f"({outcome.wall_s:.2f} s), worker CPU "
                    f"{runs[-1]['worker_cpu_ms_per_item']:.2f} ms/metric-day, "
                    f"cores used {runs[-1]['cores_used']}")
        rss = rss_bytes(pids)
    finally:
        env.stop_processes(procs)
    median = _median_run(runs)
    return Measurement(
        contender=harness.name, shape=shape, config=config, items=shape.total,
        wall_s=median["wall_s"], rate=median["rate"], runs=runs, worker_rss_bytes=rss,
        cores_used=median["cores_used"], checks=median["checks"],
        worker_cpu_ms_per_item=median["worker_cpu_ms_per_item"],
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


def measure_naive(ctx: Context, shape: Shape, sample: int) -> Measurement:
    """One thread, one client, GET + INSERT per metric-day; ``sample`` of them, extrapolated."""
    import httpx

    env = ctx.env
    vendor = env.vendor_handle
    vendor.configure(accounts=shape.accounts, services=shape.services)
    suite_dir = env.suite_dir(f"naive-{secrets.token_hex(3)}")
    sink = suite_dir / "naive.db"
    conn = common.connect_sink(sink)
    tag = f"naive-{secrets.token_hex(4)}"
    url = vendor.url
    ctx.log(f"  naive: sample of {sample} metric-days, extrapolated to {shape.total:,}")
    with httpx.Client(timeout=30) as client:
        accounts = common.list_accounts(url, client)
        items: list[dict[str, str]] = []
        for account_id in accounts:
            for svc in common.list_services(url, account_id, client):
                items += [{**svc, "day": d} for d in common.metric_days(END_DAY, shape.days)]
            if len(items) >= sample:
                break
        items = items[:sample]
        vendor.reset()
        cpu_before = time.process_time()
        started = time.perf_counter()
        for item in items:
            common.write_row(conn, common.fetch_metric(url, item, client), tag)
        elapsed = time.perf_counter() - started
        cpu_used = time.process_time() - cpu_before
    conn.close()
    checks: dict[str, Any] = {"sample": len(items)}
    _verify(checks, {
        "sink_rows": (common.sink_count(sink, tag), len(items)),
        "vendor_metric_requests": (vendor.metric_requests(), len(items)),
    })
    rate = len(items) / elapsed
    page_size = int(vendor.configure()["page_size"])
    listing_requests = 1 + shape.accounts * -(-shape.services // page_size)
    projected_wall = (shape.total + listing_requests) * elapsed / len(items)
    return Measurement(
        contender="naive", shape=shape, config=None, items=shape.total,
        wall_s=round(projected_wall, 2), rate=round(shape.total / projected_wall, 1),
        runs=[{"sample": len(items), "sample_wall_s": round(elapsed, 3),
               "sample_rate": round(rate, 1)}],
        cores_used={"driver": round(cpu_used / elapsed, 2)}, checks=checks,
        note=f"extrapolated from {len(items)} (incl. {listing_requests} listing requests)",
    )


# -- suites -------------------------------------------------------------------------------------


def _cores(m: Measurement) -> str:
    return " / ".join(
        f"{m.cores_used.get(k, 0):.2f}" for k in ("workers", "vendor", "redis", "other", "steal")
    )


def _cpu_ms(m: Measurement) -> str:
    return "-" if m.worker_cpu_ms_per_item is None else f"{m.worker_cpu_ms_per_item:.2f}"


def harvest(ctx: Context) -> SuiteResult:
    shape = QUICK_SHAPE if ctx.quick else FULL_SHAPE
    repeats = ctx.repeats
    config = MAIN_CONFIG
    result = SuiteResult("harvest", settings={
        "shape": {**asdict(shape), "total": shape.total}, "latency_ms": LATENCY_MS,
        "processes": config.processes, "pool": config.pool, "concurrency": config.concurrency,
        "dramatiq": {"processes": config.processes, "threads": config.concurrency},
        "repeats": repeats, "end_day": END_DAY, "http_retries": 0,
        "warmup_shape": asdict(WARMUP), "celery_task_events": True,
        "naive_sample": NAIVE_SAMPLE_QUICK if ctx.quick else NAIVE_SAMPLE,
    })
    measurements: dict[str, Measurement] = {}
    harnesses: list[Harness] = [FanoutHarness(), CeleryBaselineHarness(), DramatiqHarness()]
    for harness in harnesses:
        try:
            measurements[harness.name] = measure(ctx, harness, shape, config, repeats=repeats)
        except Exception as exc:
            result.errors.append(f"{harness.name}: {type(exc).__name__}: {exc}")
            ctx.log(f"  [red]{harness.name} failed[/red]: {exc}")
    try:
        sample = NAIVE_SAMPLE_QUICK if ctx.quick else NAIVE_SAMPLE
        measurements["naive"] = measure_naive(ctx, shape, sample)
    except Exception as exc:
        result.errors.append(f"naive: {type(exc).__name__}: {exc}")

    fanout = measurements.get("fanout")
    ratios: dict[str, float | None] = {}
    for name in ("celery", "dramatiq", "naive"):
        other = measurements.get(name)
        ratios[f"fanout/{name}"] = (
            round(fanout.rate / other.rate, 2) if fanout and other and other.rate else None
        )
    result.figures = {
        "metric_days_per_s": {k: m.rate for k, m in measurements.items()},
        "ratios": ratios,
        "worker_cpu_ms_per_metric_day": {
            k: m.worker_cpu_ms_per_item for k, m in measurements.items()
            if m.worker_cpu_ms_per_item is not None
        },
        "worker_rss_bytes": {
            k: m.worker_rss_bytes for k, m in measurements.items() if m.worker_rss_bytes
        },
        "measurements": {k: m.as_json() for k, m in measurements.items()},
    }
    table = Table(
        f"Harvest throughput: {shape.label} = {shape.total:,} metric-days, "
        f"{LATENCY_MS:.0f} ms vendor latency",
        ["contender", "workers", "wall s", "metric-days/s", "fanout / this",
         "worker CPU ms / metric-day", "worker RSS MiB",
         "CPU cores: workers / vendor / redis / other / steal"],
        caption="CPU cores = CPU seconds / wall seconds during the timed run "
                f"(machine: {ctx.cpu_count} cores; other = busy time of processes not ours, "
                f"steal = taken by the hypervisor: noise); median of {repeats} run(s)",
    )
    for name in ("fanout", "celery", "dramatiq", "naive"):
        m = measurements.get(name)
        if m is None:
            table.rows.append([name, "-", "-", "FAILED", "-", "-", "-", "-"])
            continue
        ratio = 1.0 if name == "fanout" else ratios.get(f"fanout/{name}")
        table.rows.append([
            name, m.config.label if m.config else "1 thread (sampled)",
            f"{m.wall_s:.2f}", fmt_rate(m.rate), fmt_ratio(ratio), _cpu_ms(m),
            fmt_mib(m.worker_rss_bytes), _cores(m) if m.config else m.note,
        ])
    result.tables.append(table)
    return result


def pools(ctx: Context) -> SuiteResult:
    shape = POOLS_SHAPE_QUICK if ctx.quick else POOLS_SHAPE
    result = SuiteResult("pools", settings={
        "shape": {**asdict(shape), "total": shape.total}, "latency_ms": LATENCY_MS,
        "configs": [asdict(c) for c in POOL_CONFIGS], "repeats": ctx.repeats,
        "skipped_configs": {"gevent": "gevent is not installed"},
    })
    measurements: list[Measurement] = []
    for config in POOL_CONFIGS:
        try:
            measurements.append(measure(ctx, FanoutHarness(), shape, config,
                                        repeats=ctx.repeats, label="pools"))
        except Exception as exc:
            result.errors.append(f"{config.label}: {type(exc).__name__}: {exc}")
    best = max(measurements, key=lambda m: m.rate, default=None)
    result.figures = {
        "metric_days_per_s": {m.config.label: m.rate for m in measurements if m.config},
        "best": best.config.label if best and best.config else None,
        "measurements": [m.as_json() for m in measurements],
    }
    table = Table(
        f"fanout pool settings: {shape.label} = {shape.total:,} metric-days on "
        f"{ctx.cpu_count} cores",
        ["workers", "wall s", "metric-days/s", "vs best", "worker CPU ms / metric-day",
         "worker RSS MiB", "CPU cores: workers / vendor / redis / other / steal"],
        caption="gevent: skipped (not installed); CPU cores as in the harvest table",
    )
    for m in measurements:
        table.rows.append([
            (m.config.label if m.config else "") + ("  (best)" if m is best else ""),
            f"{m.wall_s:.2f}", fmt_rate(m.rate),
            fmt_ratio(m.rate / best.rate if best else None), _cpu_ms(m),
            fmt_mib(m.worker_rss_bytes), _cores(m),
        ])
    result.tables.append(table)
    return result
