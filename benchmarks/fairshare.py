"""Fair share between runs: a small run started beside a backfill, on the demo pipeline.

The issue's scenario (#21): 2 worker processes (fanout's default, 32 threads each) busy on a
60,000-leaf backfill (10 accounts x 50 services x 120 days), and a 500-leaf daily run (the
same accounts and services, 1 day) started 5 s later. Measured: the daily run's wall time on
idle workers, then beside the backfill, the backfill's leaves done when the daily run ended,
and both runs checked exact (run status, ledger counts, rows in the sink). Target: beside the
backfill within 3x of idle. ``--quick``: a 6,000-leaf backfill (12 days).

Worker settings, each measured alone and beside: the demo as shipped (also with the daily
run at ``--priority 3``), and two of what makes it fair put back as they were before, to
show what each is worth: its ``services`` fan-out stage without ``claim_batch`` (one Celery
delivery per service, each waiting for a thread freed by a backfill's batch), and Celery's
prefetch at 4 (``FANOUT_PREFETCH_MULTIPLIER=4``: each hop of the daily run waits behind the
batches prefetched ahead of it). Where the daily run waited is in each run's ``timeline``:
when each stage's first and last item succeeded. ``FANOUT_BENCH_FAIRSHARE_SETTINGS``
(comma-separated names) runs only some settings.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks.core import BenchmarkError, Context, SuiteResult, Table, chosen_from_env

ACCOUNTS, SERVICES = 10, 50
BACKFILL_DAYS, BACKFILL_DAYS_QUICK, DAILY_DAYS = 120, 12, 1
HEAD_START_S = 5.0  # the backfill runs alone this long before the daily run starts
TARGET_RATIO = 3.0
SERVICES_UNCLAIMED = '[stages."demo.services"]\nclaim_batch = 1\n'
#: (name, what it is, a config file or None, Celery prefetch multiplier or None, priorities)
SETTINGS = (
    ("shipped", "the demo as shipped", None, None, (None, 3)),
    ("services_unclaimed", "services without claim_batch", SERVICES_UNCLAIMED, None, (None,)),
    ("prefetch_4", "Celery prefetch multiplier 4", None, 4, (None,)),
)

SETTINGS_ENV = "FANOUT_BENCH_FAIRSHARE_SETTINGS"  # comma-separated names; default all


def fairshare(ctx: Context) -> SuiteResult:
    chosen = chosen_from_env(SETTINGS_ENV, [name for name, *_ in SETTINGS])
    backfill_days = BACKFILL_DAYS_QUICK if ctx.quick else BACKFILL_DAYS
    repeats = ctx.repeats_or(1)
    figures: dict[str, Any] = {}
    rows = [["backfill", f"{ACCOUNTS * SERVICES * backfill_days:,} leaves, started first"],
            ["daily run", f"{ACCOUNTS * SERVICES * DAILY_DAYS:,} leaves, "
                          f"started {HEAD_START_S:.0f} s later"]]
    for name, label, config_text, prefetch, priorities in SETTINGS:
        if name not in chosen:
            continue
        measured = _measure(ctx, name, config_text, prefetch, priorities, backfill_days,
                            repeats)
        alone_s = statistics.median(measured["alone"])
        figures[f"{name}.daily_alone_s"] = alone_s
        rows.append([f"{label}: daily run alone", f"{alone_s:.2f} s"])
        for priority in priorities:
            key = "beside" if priority is None else f"beside_priority_{priority}"
            wall = statistics.median(r["daily_wall_s"] for r in measured[key])
            left = statistics.median(r["backfill_left_at_daily_end"] for r in measured[key])
            figures[f"{name}.daily_{key}_s"] = wall
            figures[f"{name}.daily_{key}_ratio"] = round(wall / alone_s, 2)
            figures[f"{name}.backfill_left_at_daily_end_{key}"] = left
            at = "" if priority is None else f", --priority {priority}"
            rows.append([f"{label}: daily run beside the backfill{at}",
                         f"{wall:.2f} s = {wall / alone_s:.2f}x alone; backfill leaves "
                         f"left then: {left:,.0f}"])
        figures[f"{name}.runs"] = measured
    table = Table("Fair share: a daily run beside a backfill (demo pipeline, 2 x 32 threads)",
                  ["what", "value"], rows,
                  caption=f"median of {repeats}; both runs exact each time")
    return SuiteResult("fairshare", settings={
        "accounts": ACCOUNTS, "services": SERVICES, "backfill_days": backfill_days,
        "daily_days": DAILY_DAYS, "head_start_s": HEAD_START_S, "repeats": repeats,
        "latency_ms": ctx.env.latency_ms,
        "worker_settings": {name: label for name, label, *_ in SETTINGS},
    }, figures=figures, tables=[table])


def _measure(
    ctx: Context, name: str, config_text: str | None, prefetch: int | None,
    priorities: tuple[int | None, ...], backfill_days: int, repeats: int,
) -> dict[str, list[Any]]:
    """On fresh workers of these settings: the daily run alone, then beside the backfill at
    each priority, ``repeats`` times."""
    from benchmarks.contenders import FanoutHarness, WorkerConfig
    from producers.processes import DEFAULT_CONCURRENCY, DEFAULT_POOL, default_processes

    env = ctx.env
    env.flush()
    env.vendor_handle.configure(accounts=ACCOUNTS, services=SERVICES)
    suite_dir = env.suite_dir("fairshare")
    extra: dict[str, str] = {}
    if config_text is not None:
        config_file = suite_dir / f"{name}.toml"
        config_file.write_text(config_text)
        extra["FANOUT_CONFIG"] = str(config_file)
    if prefetch is not None:
        extra["FANOUT_PREFETCH_MULTIPLIER"] = str(prefetch)
    config = WorkerConfig(default_processes(), DEFAULT_POOL, DEFAULT_CONCURRENCY)
    harness = FanoutHarness(extra)
    procs = harness.start(env, config, suite_dir)
    measured: dict[str, list[Any]] = {"alone": []}
    try:
        harness.wait_ready(procs, suite_dir, 60)
        _check(ctx, _run(ctx, DAILY_DAYS), DAILY_DAYS)  # warm-up: imports, connections
        for _ in range(repeats):
            alone = _run(ctx, DAILY_DAYS)
            _check(ctx, alone, DAILY_DAYS)
            measured["alone"].append(round(alone["wall_s"], 3))
            measured.setdefault("alone_timeline", []).append(alone["timeline"])
            for priority in priorities:
                key = "beside" if priority is None else f"beside_priority_{priority}"
                measured.setdefault(key, []).append(_beside(ctx, backfill_days, priority))
    finally:
        env.stop_processes(procs)
    return measured


DAILY_END, BACKFILL_END = "2026-01-31", "2026-01-30"  # no row of one is the other's


def _start(ctx: Context, days: int, priority: int | None = None) -> str:
    from producers.trigger import start_run

    end_day = DAILY_END if days == DAILY_DAYS else BACKFILL_END
    params = {"days": days, "end_day": end_day, "vendor_url": ctx.env.vendor_handle.url,
              "http_retries": 0}
    return start_run("demo", params, priority=priority)


def _run(ctx: Context, days: int, priority: int | None = None) -> dict[str, Any]:
    """The run, started and watched to its end: its wall time, and when each stage's first
    and last item succeeded (seconds from the start, polled every 20 ms): where it waited."""
    from workers.engine.services import services

    view = services().ledger.view
    started = time.perf_counter()
    run_id = _start(ctx, days, priority)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    seen: dict[str, int] = {}
    deadline = started + 600
    while time.perf_counter() < deadline:
        snap = view.snapshot(run_id)
        at = round(time.perf_counter() - started, 3)
        for stage, counts in (snap.stages if snap else {}).items():
            done = counts.get("succeeded", 0)
            if done and stage not in first:
                first[stage] = at
            if done != seen.get(stage):
                seen[stage], last[stage] = done, at
        if snap is None or snap.finished:
            break
        time.sleep(0.02)
    wall_s = time.perf_counter() - started
    timeline = {stage: [first[stage], last[stage]] for stage in first}
    return {"run_id": run_id, "wall_s": wall_s, "timeline": timeline}


def _beside(ctx: Context, backfill_days: int, priority: int | None) -> dict[str, Any]:
    """The backfill, and HEAD_START_S later the daily run; both waited for and checked."""
    from workers.engine.services import services

    backfill = _start(ctx, backfill_days)
    time.sleep(HEAD_START_S)
    daily = _run(ctx, DAILY_DAYS, priority)
    done = _leaves_done(backfill)
    _check(ctx, daily, DAILY_DAYS)
    if services().ledger.view.wait(backfill, 1800) is None:
        raise BenchmarkError(f"backfill {backfill} did not finish")
    _check(ctx, {"run_id": backfill}, backfill_days)
    total = ACCOUNTS * SERVICES * backfill_days
    return {"daily_wall_s": round(daily["wall_s"], 3), "backfill_left_at_daily_end": total - done,
            "daily_timeline": daily["timeline"]}


def _leaves_done(run_id: str) -> int:
    from workers.engine.services import services

    snap = services().ledger.view.snapshot(run_id)
    return int(snap.stages.get("metric_day", {}).get("succeeded", 0)) if snap else 0


def _check(ctx: Context, run: dict[str, Any], days: int) -> None:
    """The run succeeded with every leaf counted once and written once."""
    from benchmarks import baseline_common as common
    from workers.engine.services import services

    run_id = run["run_id"]
    snap = services().ledger.view.snapshot(run_id)
    leaves = ACCOUNTS * SERVICES * days
    if snap is None:
        raise BenchmarkError(f"run {run_id} vanished from the ledger")
    summary = snap.summary()
    counts = summary["stages"].get("metric_day", {})
    rows = common.sink_count(ctx.env.suite_dir("fairshare") / "sink.db", run_id)
    got = (summary["status"], counts.get("succeeded"), counts.get("failed"),
           summary["rows_written"], rows)
    if got != ("succeeded", leaves, 0, leaves, leaves):
        raise BenchmarkError(f"run {run_id}: status, leaves, failed, rows counted, rows in "
                             f"the sink = {got}, expected {leaves} leaves exact")
