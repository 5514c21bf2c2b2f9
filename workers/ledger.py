"""The run ledger: runs, per-stage counters, item states and failures, all in Redis.

Registering items and moving them to a terminal state are Lua scripts (``workers/lua/``), so
a duplicate delivery never double-counts, and the item that brings ``pending`` to zero
finishes the run, exactly once, without chords or polling. This module owns the keys named
in ``keys.RunKeys`` and the runs index.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from workers import keys, scripts
from workers.ids import canonical_json, to_json
from workers.keys import RunKeys
from workers.outcome import Outcome

log = logging.getLogger("fanout.ledger")

COUNTERS = ("enqueued", "succeeded", "failed", "cached", "retried", "throttled", "skipped")
FINISHED = ("succeeded", "partial", "killed", "cancelled")
# Lua's register call takes its ids as ARGV; chunks keep one call's memory bounded.
_REGISTER_CHUNK = 5000


class LedgerError(Exception):
    """The ledger refused a transition (an item never registered, a run unknown)."""


def _pairs(entries: Sequence[tuple[str, Any]]) -> list[str]:
    flat: list[str] = []
    for entry_id, payload in entries:
        flat += [entry_id, to_json(payload)]
    return flat


@dataclass(frozen=True, slots=True)
class Finish:
    """One item's terminal transition: what ``Ledger.finish_many`` records."""

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


class Ledger:
    """Run bookkeeping. One instance per process; every method is one or two round trips."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._create = scripts.load("create_run")
        self._register = scripts.load("register_items")
        self._finish = scripts.load("finish_item")
        self._advance = scripts.load("advance_loop")
        self._replay = scripts.load("replay")
        self._batch_map = scripts.load("batch_map")
        self._batch_settle = scripts.load("batch_settle")
        self._stop = scripts.load("stop_run")

    def create_run(
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
        ``hold``: the roots come next as a batch map (``batch_map(..., as_roots=True)``), and
        the run must not count as finished before."""
        now = time.time()
        # Indexed first: a run is never in Redis without being findable by the reaper.
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(keys.RUNS_INDEX, {run_id: now}, nx=True)  # a repeat keeps the first time
        pipe.zremrangebyscore(keys.RUNS_INDEX, "-inf", now - self.ttl_s)  # expired runs
        pipe.execute()
        args = [run_id, pipeline, canonical_json(params), now, self.ttl_s, root_stage,
                int(hold), *_pairs(roots)]
        return bool(self._create(self.redis, RunKeys.of(run_id), args))

    def register(self, run_id: str, stage: str, entries: Sequence[tuple[str, Any]]) -> int:
        """Register children (id, payload) as pending before they are published.
        Returns how many were new."""
        run_keys = RunKeys.of(run_id)
        new = 0
        for start in range(0, len(entries), _REGISTER_CHUNK):
            chunk = entries[start : start + _REGISTER_CHUNK]
            args = [stage, self.ttl_s, time.time(), *_pairs(chunk)]
            try:
                new += int(self._register(self.redis, run_keys, args))
            except redis.ResponseError as exc:
                raise LedgerError(f"run {run_id}: {exc}") from exc
        return new

    def finish(self, done: Finish) -> int:
        """One terminal transition: 0 duplicate (or a stale loop iteration), 1 counted,
        2 counted and the run finished."""
        return self.finish_many([done])[0]

    def finish_many(self, done: Sequence[Finish]) -> list[int]:
        """Terminal transitions of many items in one round trip, each exactly once (see
        ``finish``). An item the ledger never registered is logged and answers -1."""
        return self.finish_batch(done)[0]

    def finish_batch(self, done: Sequence[Finish]) -> tuple[list[int], list[MapSignal]]:
        """``finish_many``, and what the batch maps of these items ask the engine to do.
        One script call per run (a claimed batch is nearly always one run)."""
        if not done:
            return [], []
        now = time.time()
        by_run: dict[str, list[int]] = {}
        for index, f in enumerate(done):
            by_run.setdefault(f.run_id, []).append(index)
        codes = [0] * len(done)
        signals = []
        for run_id, indexes in by_run.items():
            args: list[Any] = [now, self.ttl_s]
            for index in indexes:
                f = done[index]
                args += (f.item_id, f.stage, f.outcome.ledger_code, f.rows,
                         canonical_json(f.failure) if f.failure else "",
                         "" if f.result is None else canonical_json(f.result), f.iteration)
            replies = self._finish(self.redis, RunKeys.of(run_id), args)
            for n, index in enumerate(indexes):
                code, map_id, deciding = replies[3 * n : 3 * n + 3]
                codes[index] = int(code)
                if code == -1:
                    log.error("run %s item %s: finish refused: NOITEM never registered",
                              run_id, done[index].item_id)
                elif map_id:
                    signals.append(MapSignal(run_id, str(map_id), bool(int(deciding))))
        return codes, signals

    # -- batch maps -------------------------------------------------------------------------

    def batch_map(
        self, run_id: str, map_id: str, task: str, stage: str, size: int,
        switch_spec: dict[str, Any] | None, per_item: bool, entries: Sequence[tuple[str, Any]],
        *, as_roots: bool = False,
    ) -> list[tuple[str, str]]:
        """Register a batch map's items; returns the first batch (id, payload JSON) to
        publish, [] when the map existed already."""
        args = [map_id, task, stage, size, canonical_json(switch_spec) if switch_spec else "",
                int(per_item), int(as_roots), time.time(), self.ttl_s, *_pairs(entries)]
        try:
            flat = self._batch_map(self.redis, RunKeys.of(run_id), args)
        except redis.ResponseError as exc:
            raise LedgerError(f"run {run_id}: {exc}") from exc
        return [(str(flat[i]), str(flat[i + 1])) for i in range(0, len(flat), 2)]

    def batch_map_state(self, run_id: str, map_id: str) -> dict[str, Any] | None:
        raw = self.redis.hget(RunKeys.of(run_id).batchmaps, map_id)
        return None if raw is None else dict(json.loads(raw))

    def deciding_maps(self, run_id: str) -> list[str]:
        """Batch maps whose completed batch was never settled (its worker died meanwhile)."""
        raw = self.redis.hgetall(RunKeys.of(run_id).batchmaps)
        return sorted(str(m) for m, state in raw.items() if json.loads(state)["deciding"] == 1)

    def settle_batch(self, run_id: str, map_id: str) -> list[tuple[str, str]]:
        """The map's completed batch passed its switch: the next batch to publish, or []
        (the last batch is done, or someone else settled it)."""
        flat = self._batch_settle(self.redis, RunKeys.of(run_id), [map_id, time.time(),
                                                                   self.ttl_s])
        return [(str(flat[i]), str(flat[i + 1])) for i in range(0, len(flat), 2)]

    def stop_run(self, run_id: str, status: str, reason: str) -> int:
        """Stop a running run (``killed`` or ``cancelled``): what no message was published for
        is skipped now, the rest as workers take it. Returns how many were skipped here, -1
        when the run had already finished."""
        try:
            return int(self._stop(self.redis, RunKeys.of(run_id),
                                  [status, reason, time.time(), self.ttl_s]))
        except redis.ResponseError as exc:
            raise LedgerError(f"run {run_id}: {str(exc).split(' ', 1)[-1]}") from None

    def note(self, run_id: str, stage: str, counter: str, by: int = 1) -> None:
        """Count a non-terminal event (a retry, a throttle) as progress of the run."""
        run_keys = RunKeys.of(run_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(run_keys.counts, f"{stage}:{counter}", by)
        pipe.hset(run_keys.run, "progress_at", time.time())
        pipe.execute()

    def record_tries(self, run_id: str, item: str, tries: int) -> tuple[int, float]:
        """Count ``tries`` failed tries of an item (failures only: off the hot path). Returns
        its total so far and the time of its first failed try."""
        run_keys, now = RunKeys.of(run_id), time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(run_keys.tries, item, tries)
        pipe.hsetnx(run_keys.tries, f"{item}@first", now)
        pipe.hget(run_keys.tries, f"{item}@first")
        pipe.expire(run_keys.tries, self.ttl_s)
        total, _, first, _ = pipe.execute()
        return int(total), float(first or now)

    def replay(self, run_id: str, items: dict[str, Any]) -> list[str]:
        """Failed items (id -> payload) back to pending in the same run, which reopens.
        Returns the ids put back; the caller publishes them."""
        args = [time.time(), self.ttl_s, *_pairs(list(items.items()))]
        try:
            return [str(i) for i in self._replay(self.redis, RunKeys.of(run_id), args)]
        except redis.ResponseError as exc:
            raise LedgerError(f"run {run_id}: {str(exc).split(' ', 1)[-1]}") from None

    def progress_many(
        self, items: Sequence[tuple[str, str]]
    ) -> list[tuple[str | None, int, bool]]:
        """(state, current loop iteration, run stopped) of many (run id, item id), in one
        round trip of three reads per run. A stopped run is killed or cancelled: its items
        are skipped."""
        by_run: dict[str, list[str]] = {}
        for run_id, item in items:
            by_run.setdefault(run_id, []).append(item)
        pipe = self.redis.pipeline(transaction=False)
        for run_id, run_items in by_run.items():
            run_keys = RunKeys.of(run_id)
            pipe.hmget(run_keys.items, run_items)
            pipe.hmget(run_keys.loops, run_items)
            pipe.hget(run_keys.run, "status")
        replies = iter(pipe.execute())
        found: dict[tuple[str, str], tuple[str | None, int, bool]] = {}
        for run_id, run_items in by_run.items():
            states, loops, status = next(replies), next(replies), next(replies)
            stopped = status in ("killed", "cancelled")
            for item, state, loop in zip(run_items, states, loops, strict=True):
                iteration = int(json.loads(loop)["iteration"]) if loop else 1
                found[run_id, item] = (None if state is None else str(state), iteration, stopped)
        return [found[key] for key in items]

    def advance_loop(
        self, run_id: str, stage: str, item: str, iteration: int, payload: Any
    ) -> bool:
        """Move a looping item from ``iteration`` to the next, exactly once."""
        state = canonical_json({"iteration": iteration + 1, "payload": payload})
        args = [item, stage, iteration, state, time.time(), self.ttl_s]
        return bool(self._advance(self.redis, RunKeys.of(run_id), args))

    def loop_states(self, run_id: str) -> dict[str, dict[str, Any]]:
        """Loop state {iteration, payload} of every item that is looping."""
        raw = self.redis.hgetall(RunKeys.of(run_id).loops)
        return {str(k): json.loads(v) for k, v in raw.items()}

    def results(self, run_id: str) -> list[Any]:
        """What each root item returned, in the order the roots were given."""
        roots = self.redis.lrange(RunKeys.of(run_id).roots, 0, -1)
        values = self.redis.hmget(RunKeys.of(run_id).results, roots) if roots else []
        return [None if v is None else json.loads(v) for v in values]

    def pending_payloads(self, run_id: str) -> dict[str, Any]:
        """Payloads of the items not yet terminal."""
        raw = self.redis.hgetall(RunKeys.of(run_id).payloads)
        return {str(k): json.loads(v) for k, v in raw.items()}

    def running_runs(self) -> list[tuple[str, str, float]]:
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

    def params(self, run_id: str) -> dict[str, Any]:
        raw = self.redis.hget(RunKeys.of(run_id).run, "params")
        if raw is None:
            raise KeyError(run_id)
        return dict(json.loads(str(raw)))

    def snapshot(self, run_id: str, stage_order: Iterable[str] = ()) -> RunSnapshot | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(RunKeys.of(run_id).run)
        pipe.hgetall(RunKeys.of(run_id).counts)
        pipe.hlen(RunKeys.of(run_id).failed)
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
        raw = self.redis.hgetall(RunKeys.of(run_id).failed)
        return {str(item): json.loads(value) for item, value in raw.items()}

    def wait(self, run_id: str, timeout_s: float) -> str | None:
        """Block until the run finishes (BLPOP on its done list) or ``timeout_s`` passes."""
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

    def recent_runs(self, count: int = 20) -> list[str]:
        """The ids of the latest ``count`` runs, newest first."""
        return [str(i) for i in self.redis.zrevrange(keys.RUNS_INDEX, 0, count - 1)]

    def latest_run(self) -> str | None:
        ids = self.redis.zrevrange(keys.RUNS_INDEX, 0, 0)
        return str(ids[0]) if ids else None
