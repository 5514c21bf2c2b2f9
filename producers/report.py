"""Showing a run in the terminal: a progress bar per stage while it runs, a summary after."""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from producers.errors import RunNotFound
from workers.ledger import COUNTERS, Ledger, RunSnapshot

TERMINAL_COUNTERS = ("succeeded", "failed", "cached", "skipped")
_REFRESH_S = 0.25


def exit_code(status: str) -> int:
    """0 succeeded; 1 finished with failures, killed or cancelled (DESIGN section 6)."""
    return 0 if status == "succeeded" else 1


def done_count(counts: dict[str, int]) -> int:
    return sum(counts.get(c, 0) for c in TERMINAL_COUNTERS)


def wait_for_run(
    ledger: Ledger,
    run_id: str,
    stage_order: Sequence[str],
    *,
    console: Console | None,
    timeout_s: float | None = None,
) -> RunSnapshot:
    """Wait for the run to finish. The finish itself wakes us (BLPOP); the bars refresh
    from the counters between wake-ups. With ``console`` None nothing is drawn."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    progress = _progress(console) if console else None
    bars: dict[str, TaskID] = {}
    try:
        if progress:
            progress.start()
        while True:
            status = ledger.wait(run_id, timeout_s=_REFRESH_S)
            snap = ledger.snapshot(run_id, stage_order)
            if snap is None:
                raise RunNotFound(f"run {run_id} is unknown or expired")
            if progress:
                _update(progress, bars, snap)
            if status is not None or snap.finished:
                return snap
            if deadline is not None and time.monotonic() > deadline:
                return snap
    finally:
        if progress:
            progress.stop()


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _update(progress: Progress, bars: dict[str, TaskID], snap: RunSnapshot) -> None:
    for stage, counts in snap.stages.items():
        if stage not in bars:
            bars[stage] = progress.add_task(stage, total=None, failed=0)
        total = counts.get("enqueued", 0)
        progress.update(
            bars[stage],
            total=total or None,
            completed=done_count(counts),
            failed=counts.get("failed", 0),
        )


def summary_table(snap: RunSnapshot) -> Table:
    table = Table(title=f"run {snap.run_id} ({snap.pipeline}): {snap.status}")
    counters = list(COUNTERS)
    if any(counts.get("iterations") for counts in snap.stages.values()):
        counters.append("iterations")  # loop iterations, for stages that loop
    table.add_column("stage")
    for counter in counters:
        table.add_column(counter, justify="right")
    for stage, counts in snap.stages.items():
        table.add_row(stage, *(str(counts.get(c, 0)) for c in counters))
    leaves = list(snap.stages.values())[-1]["succeeded"] if snap.stages else 0
    rate = leaves / snap.wall_s if snap.wall_s > 0 else 0.0
    table.caption = (
        f"rows written {snap.rows_written} · wall {snap.wall_s:.2f}s · "
        f"{rate:,.0f} leaf items/s · failed items {snap.failed_items}"
    )
    return table
