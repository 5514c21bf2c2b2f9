"""What watchers read of runs: ``fanout status`` and ``failures``, ``--wait``, the JSON
summary, ``run.results()``. Reads only: the one write, in ``wait``, puts back the done
list's element that its BLPOP took."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import redis

from workers import keys
from workers.keys import RunKeys
from workers.ledger.records import COUNTERS, RunSnapshot


class RunView:
    """Snapshots, failures, results and parameters of runs, and waiting for one to end."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s

    def snapshot(self, run_id: str, stage_order: Iterable[str] = ()) -> RunSnapshot | None:
        """The run's status and counters (stages in ``stage_order`` first), None when the
        run is unknown or expired."""
        run_keys = RunKeys.of(run_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(run_keys.run)
        pipe.hgetall(run_keys.counts)
        pipe.hlen(run_keys.failed)
        run, counts, failed = pipe.execute()
        if not run:
            return None
        order = list(stage_order)
        stages: dict[str, dict[str, int]] = {s: dict.fromkeys(COUNTERS, 0) for s in order}
        for name, value in counts.items():
            if ":" not in name:
                continue
            stage, counter = name.rsplit(":", 1)
            stages.setdefault(stage, dict.fromkeys(COUNTERS, 0))[counter] = int(value)
        finished_at = run.get("finished_at")
        return RunSnapshot(
            run_id=run_id,
            pipeline=run.get("pipeline", ""),
            status=run.get("status", "unknown"),
            params=json.loads(run.get("params", "{}")),
            created_at=float(run["created_at"]),
            finished_at=float(finished_at) if finished_at else None,
            pending=int(run.get("pending", 0)),
            stages=stages,
            rows_written=int(counts.get("rows", 0)),
            failed_items=int(failed),
            stage_order=order,
            stop_reason=run.get("stop_reason"),
        )

    def failures(self, run_id: str) -> dict[str, dict[str, Any]]:
        """Failed items: id -> {stage, item, error_type, message, attempts}."""
        raw = self.redis.hgetall(RunKeys.of(run_id).failed)
        return {str(item): json.loads(value) for item, value in raw.items()}

    def results(self, run_id: str) -> list[Any]:
        """What each root item returned, in the order the roots were given."""
        roots = self.redis.lrange(RunKeys.of(run_id).roots, 0, -1)
        values = self.redis.hmget(RunKeys.of(run_id).results, roots) if roots else []
        return [None if v is None else json.loads(v) for v in values]

    def params(self, run_id: str) -> dict[str, Any]:
        """The run's parameters; ``KeyError`` when the run is unknown or expired."""
        raw = self.redis.hget(RunKeys.of(run_id).run, "params")
        if raw is None:
            raise KeyError(run_id)
        return dict(json.loads(str(raw)))

    def recent_runs(self, count: int = 20) -> list[str]:
        """The ids of the latest ``count`` runs, newest first."""
        return [str(i) for i in self.redis.zrevrange(keys.RUNS_INDEX, 0, count - 1)]

    def latest_run(self) -> str | None:
        """The id of the newest run, or None."""
        ids = self.redis.zrevrange(keys.RUNS_INDEX, 0, 0)
        return str(ids[0]) if ids else None

    def wait(self, run_id: str, timeout_s: float) -> str | None:
        """Block until the run finishes (BLPOP on its done list) or ``timeout_s`` passes;
        the status it finished with, or None."""
        done_key = RunKeys.of(run_id).done
        deadline = time.monotonic() + timeout_s
        while True:
            # Short slices: the client's socket timeout (redis-py: 5 s) bounds one BLPOP.
            slice_s = max(0.01, min(2.0, deadline - time.monotonic()))
            popped = self.redis.blpop([done_key], timeout=slice_s)
            if popped is not None:
                status = str(popped[1])
                # Put it back for other waiters; the pop deleted the key, and its TTL with it.
                pipe = self.redis.pipeline(transaction=False)
                pipe.rpush(done_key, status)
                pipe.expire(done_key, self.ttl_s)
                pipe.execute()
                return status
            if time.monotonic() >= deadline:
                return None
