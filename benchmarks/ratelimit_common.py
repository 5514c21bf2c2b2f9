"""What the ``ratelimit`` suite's per-key and auto-rate cases share: a checked harvest run that
can act on the vendor mid-run, the vendor's clock, and arithmetic on the vendor's per-second
series (``/_admin/stats``' ``per_second``: [whole monotonic second, arrived, served, 429s]).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.contenders import END_DAY, Shape
from benchmarks.core import BenchmarkError
from benchmarks.env import BenchEnv, VendorHandle


def vendor_offset(vendor: VendorHandle) -> float:
    """The vendor's ``time.monotonic()`` minus ours (the same clock on one Linux host, but
    measured rather than assumed): ours read around its stats call, the midpoint taken."""
    before = time.monotonic()
    now = float(vendor.stats()["monotonic_now"])
    after = time.monotonic()
    return now - (before + after) / 2


@dataclass
class Action:
    """``act()`` once ``at_s`` seconds have passed since the trigger; ``done_at`` is then the
    vendor-clock time it ran."""

    at_s: float
    act: Callable[[], object]
    done_at: float | None = None


@dataclass
class HarvestRun:
    run_id: str
    wall_s: float
    #: the vendor-clock time just before the trigger
    started_at: float
    checks: dict[str, Any] = field(default_factory=dict)


def run_harvest(
    env: BenchEnv, pipeline: str, shape: Shape, suite_dir: Path, *, http_retries: int,
    timeout_s: float, actions: Sequence[Action] = (),
) -> HarvestRun:
    """Start ``pipeline`` over ``shape``, run ``actions`` at their times, wait for the run's
    end; it must end ``succeeded`` with one row per metric-day in the ledger and the sink."""
    from benchmarks import baseline_common as common
    from producers.trigger import start_run
    from workers.engine.services import services

    offset = vendor_offset(env.vendor_handle)
    params = {"days": shape.days, "end_day": END_DAY, "vendor_url": env.vendor_handle.url,
              "http_retries": http_retries}
    ledger = services().ledger
    started = time.monotonic()
    run_id = start_run(pipeline, params)
    deadline = started + timeout_s
    status = None
    pending = sorted(actions, key=lambda a: a.at_s)
    while status is None and time.monotonic() < deadline:
        until = deadline if not pending else min(deadline, started + pending[0].at_s)
        status = ledger.view.wait(run_id, max(0.0, until - time.monotonic()))
        if status is None and pending and time.monotonic() >= started + pending[0].at_s:
            action = pending.pop(0)
            action.act()
            action.done_at = time.monotonic() + offset
    wall = time.monotonic() - started
    if status is None:
        raise BenchmarkError(f"{pipeline} run {run_id} not finished after {timeout_s:.0f} s")
    snapshot = ledger.view.snapshot(run_id)
    if snapshot is None:
        raise BenchmarkError(f"run {run_id} vanished from the ledger")
    summary = snapshot.summary()
    leaves = summary["stages"].get("metric_day", {})
    checks: dict[str, Any] = {"run_id": run_id, "pipeline": pipeline, "status": status,
                              "rows_written": summary["rows_written"],
                              "metric_day_succeeded": leaves.get("succeeded"),
                              "sink_rows": common.sink_count(suite_dir / "sink.db", run_id)}
    wants = {"status": "succeeded", "rows_written": shape.total,
             "metric_day_succeeded": shape.total, "sink_rows": shape.total}
    for what, want in wants.items():
        if checks[what] != want:
            raise BenchmarkError(f"{pipeline} run {run_id}: {what} is {checks[what]!r}, "
                                 f"expected {want!r} ({checks})")
    return HarvestRun(run_id, wall, started + offset, checks)


def seconds_between(
    rows: Sequence[Sequence[int]], start: float, end: float
) -> list[Sequence[int]]:
    """The rows of whole seconds lying entirely within [start, end), a missing second (no
    request arrived in it) as a row of zeros."""
    by_second = {int(row[0]): row for row in rows}
    width = len(rows[0]) if rows else 1
    first, last = int(-(-start // 1)), int(end // 1)  # ceil(start); seconds s with s + 1 <= end
    return [by_second.get(s, [s] + [0] * (width - 1)) for s in range(first, last)]


def mean_column(rows: Sequence[Sequence[int]], column: int) -> float | None:
    return sum(row[column] for row in rows) / len(rows) if rows else None
