"""Flower's memory on a long-lived deployment: its RSS after 200,000 items (``--quick``: 20,000).

For each ``--max-tasks`` (``fanout flower``'s default, then Flower's own 100,000), on a fresh
Redis: `fanout flower` starts as a user starts it (basic auth on), then fanout's own workers
(one process per core, 32 threads) run the sleep-leaf pipeline (``benchsleep``) with a leaf that
does not sleep: real workers sending their real task events (Celery's for each task's own
message, fanout's batched ones for each item a task claimed). Once the run has succeeded and
Flower has counted a task-succeeded event for every item (its ``flower_events_total`` on
``/metrics``: none lost) and for each further page of an account's services (a loop
iteration is a task too), Flower's RSS (``VmRSS``) and peak RSS (``VmHWM``) are read from
``/proc``. A message delivered twice (at least once) would add an event: counted, not an error.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.core import BenchmarkError, Context, SuiteResult, Table, fmt_mib
from benchmarks.env import BenchEnv, python

FULL_SHAPE_ARGS = (20, 100, 100)  # accounts x services x days: 200,000 metric-days
QUICK_SHAPE_ARGS = (4, 50, 100)  # 20,000
FLOWER_DEFAULT_MAX_TASKS = 100_000  # Flower's own --max_tasks default
EVENTS_TIMEOUT_S = 300.0


def flower_memory(ctx: Context) -> SuiteResult:
    from benchmarks.harvest import MAIN_CONFIG, FanoutHarness, Shape
    from producers.flower import DEFAULT_MAX_TASKS

    shape = Shape(*(QUICK_SHAPE_ARGS if ctx.quick else FULL_SHAPE_ARGS))
    items = shape.accounts + shape.accounts * shape.services + shape.total
    env = ctx.env
    vendor = env.vendor_handle
    bounds = [DEFAULT_MAX_TASKS, FLOWER_DEFAULT_MAX_TASKS]
    result = SuiteResult("flower", settings={
        "shape": shape.label, "items": items, "max_tasks": bounds,
        "workers": MAIN_CONFIG.label, "pipeline": "benchsleep, leaf sleeps 0 ms",
        "events": "real task events from fanout's workers"})
    runs: dict[str, dict[str, Any]] = {}
    for max_tasks in bounds:
        env.flush()
        page_size = vendor.configure(accounts=shape.accounts,
                                     services=shape.services)["page_size"]
        events = items + shape.accounts * (math.ceil(shape.services / page_size) - 1)
        suite_dir = env.suite_dir(f"flower-{max_tasks}")
        ctx.log(f"  Flower --max-tasks {max_tasks:,}: {items:,} items")
        runs[str(max_tasks)] = _measure(ctx, env, suite_dir, shape, events, max_tasks,
                                        FanoutHarness({"BENCH_LATENCY_MS": "0"}, sleep=True),
                                        MAIN_CONFIG)
    result.figures = {"runs": runs}
    table = Table(f"Flower's memory after {items:,} items ({shape.label} metric-days and the "
                  "stages above them)",
                  ["--max-tasks", "RSS MiB at start", "RSS MiB after", "peak RSS MiB",
                   "task-succeeded events / expected", "run wall s"],
                  caption="RSS of the Flower process (VmRSS, VmHWM) once it has counted a "
                          "task-succeeded event for every item")
    for bound, run in runs.items():
        table.rows.append([f"{int(bound):,}", fmt_mib(run["rss_start_bytes"]),
                           fmt_mib(run["rss_after_bytes"]), fmt_mib(run["peak_rss_bytes"]),
                           f"{run['task_succeeded_events']:,} / {run['expected_events']:,}",
                           f"{run['run_wall_s']:.0f}"])
    result.tables.append(table)
    return result


def _measure(ctx: Context, env: BenchEnv, suite_dir: Path, shape: Any, events: int,
             max_tasks: int, harness: Any, config: Any) -> dict[str, Any]:
    auth = ("bench", secrets.token_hex(8))
    port = _free_port()
    flower = env.spawn([python(), "-m", "producers.cli", "flower", "--port", str(port),
                        "--max-tasks", str(max_tasks)],
                       {"FLOWER_BASIC_AUTH": ":".join(auth), "FANOUT_REDIS_URL": env.redis_url},
                       suite_dir / "flower.log")
    url = f"http://127.0.0.1:{port}"
    workers = []
    try:
        _wait(lambda: _answers(f"{url}/healthcheck"), 60, "Flower answering",
              suite_dir / "flower.log")
        rss_start = _status_bytes(flower.pid, "VmRSS")
        workers = harness.start(env, config, suite_dir)
        harness.wait_ready(workers, suite_dir, 60)
        outcome = harness.run(env, shape, suite_dir)
        _wait(lambda: (_succeeded_events(url, auth) or 0) >= events, EVENTS_TIMEOUT_S,
              f"Flower counting {events:,} task-succeeded events", suite_dir / "flower.log")
        counted = _succeeded_events(url, auth)
        if counted is None:
            raise BenchmarkError("Flower's /metrics did not answer")
        return {"rss_start_bytes": rss_start, "rss_after_bytes": _status_bytes(flower.pid, "VmRSS"),
                "peak_rss_bytes": _status_bytes(flower.pid, "VmHWM"),
                "task_succeeded_events": counted, "expected_events": events,
                "run_wall_s": round(outcome.wall_s, 1),
                "run_id": outcome.checks["run_id"]}
    finally:
        env.stop_processes([*workers, flower])


def _free_port() -> int:
    from workers.embedded_redis import free_port

    return free_port()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _succeeded_events(url: str, auth: tuple[str, str]) -> int | None:
    """task-succeeded events Flower has counted (its Prometheus counter, every task name);
    None while Flower is too busy with the events to answer within a minute."""
    try:
        text = httpx.get(f"{url}/metrics", auth=auth, timeout=60).text
    except httpx.TimeoutException:
        return None
    return sum(int(float(m[1])) for m in re.finditer(
        r'^flower_events_total\{[^}]*type="task-succeeded"[^}]*\} (\S+)$', text, re.M))


def _status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise BenchmarkError(f"no {field} for process {pid}")


def _wait(predicate: Any, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(2)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise BenchmarkError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{tail}")
