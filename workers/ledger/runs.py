"""A run's life: created with its roots, stopped, replayed, and watched by the reaper.

Owns the runs index (``keys.RUNS_INDEX``) and the run hash's status. A run ends in Lua only
(``lua/_end_run.lua``), when its last pending item or batch map token is gone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis

from workers import keys, scripts
from workers.ids import canonical_json
from workers.keys import RunKeys
from workers.ledger.calls import call, flat_pairs


class Runs:
    """Create, stop and replay runs; the reaper's list of running runs."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._create = scripts.load("create_run")
        self._stop = scripts.load("stop_run")
        self._replay = scripts.load("replay")

    def create(
        self,
        run_id: str,
        pipeline: str,
        params: dict[str, Any],
        root_stage: str,
        roots: Sequence[tuple[str, Any]],
        *,
        hold: bool = False,
    ) -> bool:
        """Create the run with its roots registered. Idempotent: False when it existed.
        ``hold``: the roots come next as a batch map (``BatchMaps.create(..., as_roots=True)``),
        and the run must not count as finished before."""
        now = time.time()
        # Indexed first: a run is never in Redis without being findable by the reaper.
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(keys.RUNS_INDEX, {run_id: now}, nx=True)  # a repeat keeps the first time
        pipe.zremrangebyscore(keys.RUNS_INDEX, "-inf", now - self.ttl_s)  # expired runs
        pipe.execute()
        args = [run_id, pipeline, canonical_json(params), now, self.ttl_s, root_stage,
                int(hold), *flat_pairs(roots)]
        return bool(call(self._create, self.redis, run_id, args))

    def stop(self, run_id: str, status: str, reason: str) -> int:
        """Stop a running run (``killed`` or ``cancelled``): what no message was published for
        is skipped now, the rest as workers take it. Returns how many were skipped here, -1
        when the run was no longer running. ``LedgerError`` NORUN: unknown or expired."""
        return int(call(self._stop, self.redis, run_id,
                        [status, reason, time.time(), self.ttl_s]))

    def replay(self, run_id: str, items: dict[str, Any]) -> list[str]:
        """Failed items (id -> payload) back to pending in the same run, which reopens.
        Returns the ids put back; the caller publishes them. ``LedgerError`` NORUN or
        STOPPED (a killed or cancelled run is not reopened)."""
        args = [time.time(), self.ttl_s, *flat_pairs(list(items.items()))]
        return [str(i) for i in call(self._replay, self.redis, run_id, args)]

    def running(self) -> list[tuple[str, str, float]]:
        """(run id, pipeline, time of its last progress) for every run still running."""
        ids = [str(i) for i in self.redis.zrange(keys.RUNS_INDEX, 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for run_id in ids:
            pipe.hmget(RunKeys.of(run_id).run, "status", "pipeline", "progress_at")
        running = []
        for run_id, (status, pipeline, progress_at) in zip(ids, pipe.execute(), strict=True):
            if status == "running" and progress_at:
                running.append((run_id, str(pipeline), float(progress_at)))
        return running

    def touch(self, run_id: str) -> None:
        """Count as progress (the reaper just acted on this run)."""
        self.redis.hset(RunKeys.of(run_id).run, "progress_at", time.time())
