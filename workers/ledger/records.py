"""What the ledger hands out and takes in: the counter names, the run statuses, a terminal
transition (``Finish``), a batch map's signal (``MapSignal``) and a run's snapshot."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from workers.outcome import Outcome

COUNTERS = ("enqueued", "succeeded", "failed", "cached", "retried", "throttled", "skipped")
FINISHED = ("succeeded", "partial", "killed", "cancelled")


@dataclass(frozen=True, slots=True)
class Finish:
    """One item's terminal transition: what ``Items.finish_batch`` records."""

    run_id: str
    stage: str
    item_id: str
    outcome: Outcome
    iteration: int = 1  # the iteration that ended the item (1 unless it looped)
    rows: int = 0  # sink rows written for it
    result: Any = None  # a JSON value kept for ``results`` (small runs)
    failure: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class MapSignal:
    """A finished item of a batch map: ``deciding`` when it completed its batch (check the
    kill switch, then settle), else a per-item switch check."""

    run_id: str
    map_id: str
    deciding: bool


@dataclass
class RunSnapshot:
    """What ``fanout status`` and the JSON summary show of one run."""

    run_id: str
    pipeline: str
    status: str
    params: dict[str, Any]
    created_at: float
    finished_at: float | None
    pending: int
    stages: dict[str, dict[str, int]]
    rows_written: int
    failed_items: int = 0
    stage_order: list[str] = field(default_factory=list)
    stop_reason: str | None = None  # why a killed or cancelled run stopped

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def wall_s(self) -> float:
        end = self.finished_at if self.finished_at is not None else time.time()
        return round(end - self.created_at, 3)

    def summary(self) -> dict[str, Any]:
        """The JSON summary contract (DESIGN section 6), with ``stop_reason`` for a run that
        a kill switch or a person stopped."""
        summary: dict[str, Any] = {
            "run_id": self.run_id,
            "pipeline": self.pipeline,
            "status": self.status,
            "stages": self.stages,
            "rows_written": self.rows_written,
            "wall_s": self.wall_s,
        }
        if self.stop_reason:
            summary["stop_reason"] = self.stop_reason
        return summary
