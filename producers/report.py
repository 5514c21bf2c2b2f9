"""Showing a run in the terminal: a progress bar per stage while it runs, a summary after.

Waiting rides out an outage of Redis: one line when it goes, one when it is back, and it gives
up (one line, exit 1) only after ``FANOUT_OUTAGE_LIMIT_S``. It also says, once, why a run
stands still: workers that cannot write to the sink (they note it in Redis,
``outage.SinkOutageNote``), or messages on a stage queue that no worker takes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

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
from workers.engine.services import services
from workers.keys import queue_name
from workers.ledger import COUNTERS, Ledger, RunSnapshot
from workers.outage import DOWN_ERRORS, Outage, SinkOutageNote, where
from workers.settings import get_settings

TERMINAL_COUNTERS = ("succeeded", "failed", "cached", "skipped")
_REFRESH_S = 0.25
#: A run without progress this long, with messages waiting on a stage queue that do not go
#: down, has no worker taking them.
NO_WORKER_S = 5.0


class RedisGone(SystemExit):
    """Redis stayed unreachable longer than the outage limit (the line is printed): exit 1.
    ``last``: the run as last seen before the outage (None if never seen)."""

    def __init__(self, last: RunSnapshot | None = None, down_for_s: float = 0.0) -> None:
        super().__init__(1)
        self.last = last
        self.down_for_s = down_for_s


def exit_code(status: str) -> int:
    """0 succeeded; 1 finished with failures, killed or cancelled (DESIGN section 6)."""
    return 0 if status == "succeeded" else 1


def done_count(counts: dict[str, int]) -> int:
    return sum(counts.get(c, 0) for c in TERMINAL_COUNTERS)


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class NoWorkerWatch:
    """Says once per standstill why the run made no progress for ``after_s``: workers noted
    that they cannot write to the sink (``sink_down`` returns their error), or else no worker
    takes a stage's messages: a queue's depth stayed above 0 without going down (a worker
    that takes messages lowers it, even while its tasks run long)."""

    def __init__(
        self, depth: Callable[[str], int], say: Callable[[str], None], *,
        clock: Callable[[], float] = time.monotonic, after_s: float = NO_WORKER_S,
        sink_down: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.depth = depth
        self.say = say
        self.sink_down = sink_down
        self.clock = clock
        self.after_s = after_s
        self._progress: object = None
        self._since = clock()
        self._first: dict[str, int] | None = None  # depths half way through the standstill
        self._told = False  # of the queues
        self._told_sink = False

    def update(self, progress: object, queues: Sequence[str]) -> None:
        now = self.clock()
        if progress != self._progress:
            self._progress, self._since, self._first = progress, now, None
            self._told = self._told_sink = False
            return
        idle_s = now - self._since
        if idle_s >= self.after_s and not self._told_sink:
            # Said even after the line about the queues: workers stuck at their sink gate
            # hold messages too, and it is the reason.
            error = self.sink_down()
            if error:
                self.say(f"workers are up but cannot write to the sink: {error}")
                self._told_sink = self._told = True
                return
        if self._told or idle_s < self.after_s / 2:
            return
        if self._first is None:
            self._first = {q: self.depth(q) for q in queues}
            return
        if idle_s < self.after_s:
            return
        for queue in queues:
            waiting = self.depth(queue)
            if waiting > 0 and waiting >= self._first.get(queue, 0):
                self.say(f"no worker is taking messages from {queue}: {waiting} waiting; "
                         "start one with `fanout worker`")
                self._told = True
                return
        self._since, self._first = now, None  # they went down: someone takes them


def wait_for_run(
    ledger: Ledger,
    run_id: str,
    stage_order: Sequence[str],
    *,
    console: Console | None,
    timeout_s: float | None = None,
    outage_limit_s: float | None = None,
    depth: Callable[[str], int] | None = None,
) -> RunSnapshot:
    """Wait for the run to finish. The finish itself wakes us (BLPOP); the bars refresh
    from the counters between wake-ups. With ``console`` None nothing is drawn, and the
    lines about an outage or a missing worker go to stderr.

    Through an outage of Redis it keeps waiting; after ``outage_limit_s`` (default
    ``FANOUT_OUTAGE_LIMIT_S``) of it, it says so and raises ``RedisGone`` (exit 1)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    limit_s = get_settings().outage_limit_s if outage_limit_s is None else outage_limit_s
    say = console.print if console else _to_stderr
    url = where(ledger.redis)
    outage = Outage(say, f"Redis at {url} unreachable: waiting for it (gives up after "
                         f"{limit_s:.0f} s)", "Redis is back after {seconds:.1f} s",
                    max_delay_s=1.0)
    idle = NoWorkerWatch(depth or services().transport.queue_depth, say,
                         sink_down=lambda: SinkOutageNote.read(ledger.redis))
    progress = _progress(console) if console else None
    bars: dict[str, TaskID] = {}
    snap: RunSnapshot | None = None
    try:
        if progress:
            progress.start()
        while True:
            try:
                status = ledger.view.wait(run_id, timeout_s=_REFRESH_S)
                found = ledger.view.snapshot(run_id, stage_order)
                if found is not None and not found.finished and status is None:
                    idle.update(_counts(found), [queue_name(found.pipeline, s)
                                                 for s in found.stages])
            except DOWN_ERRORS as exc:
                delay_s = outage.failed(exc)
                if outage.down_for_s() >= limit_s:
                    say(f"Redis at {url} still unreachable after {outage.down_for_s():.0f} s: "
                        "giving up")
                    raise RedisGone(snap, outage.down_for_s()) from None
                if deadline is not None and snap is not None and time.monotonic() > deadline:
                    return snap
                time.sleep(delay_s)
                continue
            outage.ok()
            if found is None:
                raise RunNotFound(f"run {run_id} is unknown or expired")
            snap = found
            if progress:
                _update(progress, bars, snap)
            if status is not None or snap.finished:
                return snap
            if deadline is not None and time.monotonic() > deadline:
                return snap
    finally:
        if progress:
            progress.stop()


def _counts(snap: RunSnapshot) -> list[tuple[str, list[tuple[str, int]]]]:
    """The run's counters, comparable: any change is progress."""
    return [(stage, sorted(counts.items())) for stage, counts in sorted(snap.stages.items())]


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
