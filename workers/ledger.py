"""The run ledger: runs, per-stage counters, item states and failures, all in Redis.

Registering items and moving them to a terminal state are Lua scripts (``workers/lua/``), so
a duplicate delivery never double-counts, and the item that brings ``pending`` to zero
finishes the run, exactly once, without chords or polling.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import redis

from workers import keys

COUNTERS = ("enqueued", "succeeded", "failed", "cached", "retried", "throttled", "skipped")
FINISHED = ("succeeded", "partial", "killed", "cancelled")
Outcome = Literal["succeeded", "failed", "cached", "skipped"]
_OUTCOME_CODES = {"succeeded": "s", "failed": "f", "cached": "c", "skipped": "k"}
# Lua's register call takes its ids as ARGV; chunks keep one call's memory bounded.
_REGISTER_CHUNK = 5000


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


class RawJSON(str):
    """Text that is already (canonical) JSON: a fan-out serializes each child once and uses
    the text for its id, its ledger payload and its message."""

    __slots__ = ()


def to_json(value: Any) -> str:
    return value if isinstance(value, RawJSON) else canonical_json(value)


def item_id(stage: str, parent_id: str, index: int, args: Any) -> str:
    """Deterministic id of one item: the same child of the same parent always gets the same id."""
    digest = hashlib.blake2b(
        f"{parent_id}|{stage}|{index}|{to_json(args)}".encode(), digest_size=8
    ).hexdigest()
    return f"{stage}:{digest}"


def _pairs(entries: Sequence[tuple[str, Any]]) -> list[str]:
    flat: list[str] = []
    for entry_id, payload in entries:
        flat += [entry_id, to_json(payload)]
    return flat


def _load(name: str) -> str:
    return resources.files("workers").joinpath("lua", name).read_text()


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

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def wall_s(self) -> float:
        end = self.finished_at if self.finished_at is not None else time.time()
        return round(end - self.created_at, 3)

    def summary(self) -> dict[str, Any]:
        """The JSON summary contract (DESIGN section 6)."""
        return {
            "run_id": self.run_id,
            "pipeline": self.pipeline,
            "status": self.status,
            "stages": self.stages,
            "rows_written": self.rows_written,
            "wall_s": self.wall_s,
        }


class Ledger:
    """Run bookkeeping. One instance per process; every method is one or two round trips."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._create = client.register_script(_load("create_run.lua"))
        self._register = client.register_script(_load("register_items.lua"))
        self._finish = client.register_script(_load("finish_item.lua"))
        self._advance = client.register_script(_load("advance_loop.lua"))

    def create_run(
        self,
        run_id: str,
        pipeline: str,
        params: dict[str, Any],
        root_stage: str,
        roots: Sequence[tuple[str, Any]],
    ) -> int:
        run_keys = keys.run_keys(run_id)
        args: list[str | float] = [
            run_id, pipeline, canonical_json(params), time.time(), self.ttl_s, root_stage,
            *_pairs(roots),
        ]
        return int(self._create(keys=[*run_keys, keys.RUNS_INDEX], args=args))

    def register(self, run_id: str, stage: str, entries: Sequence[tuple[str, Any]]) -> int:
        """Register children (id, payload) as pending before they are published.
        Returns how many were new."""
        k = keys.run_keys(run_id)
        run_keys = [k[0], k[1], k[2], k[5]]  # run, counts, items, payloads
        new = 0
        for start in range(0, len(entries), _REGISTER_CHUNK):
            chunk = entries[start : start + _REGISTER_CHUNK]
            args: list[str | float] = [stage, self.ttl_s, time.time(), *_pairs(chunk)]
            new += int(self._register(keys=run_keys, args=args))
        return new

    def finish(
        self,
        run_id: str,
        stage: str,
        item: str,
        outcome: Outcome,
        *,
        rows: int = 0,
        failure: dict[str, Any] | None = None,
        result: Any = None,
        iteration: int = 1,
    ) -> int:
        """Terminal transition: 0 duplicate (or a stale loop iteration), 1 counted,
        2 counted and the run finished."""
        return int(
            self._finish(
                keys=keys.run_keys(run_id)[:8],
                args=[
                    item,
                    stage,
                    _OUTCOME_CODES[outcome],
                    rows,
                    canonical_json(failure) if failure else "",
                    time.time(),
                    self.ttl_s,
                    "" if result is None else canonical_json(result),
                    iteration,
                ],
            )
        )

    def finish_many(self, successes: Sequence[tuple[str, str, str, int, Any, int]]) -> None:
        """Move many items to succeeded in one round trip: (run, stage, item, rows, result,
        iteration) each, with the same exactly-once script as ``finish``."""
        if not successes:
            return
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for run_id, stage, item, rows, result, iteration in successes:
            self._finish(
                keys=keys.run_keys(run_id)[:8],
                args=[item, stage, "s", rows, "", now, self.ttl_s,
                      "" if result is None else canonical_json(result), iteration],
                client=pipe,
            )
        pipe.execute()

    def progress_many(self, items: Sequence[tuple[str, str]]) -> list[tuple[str | None, int]]:
        """``item_progress`` of many (run id, item id) in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for run_id, item in items:
            pipe.hget(keys.run_items(run_id), item)
            pipe.hget(keys.run_loops(run_id), item)
        replies = pipe.execute()
        progress = []
        for state, loop in zip(replies[::2], replies[1::2], strict=True):
            iteration = int(json.loads(loop)["iteration"]) if loop else 1
            progress.append((None if state is None else str(state), iteration))
        return progress

    def advance_loop(
        self, run_id: str, stage: str, item: str, iteration: int, payload: Any
    ) -> bool:
        """Move a looping item from ``iteration`` to the next, exactly once."""
        k = keys.run_keys(run_id)
        state = canonical_json({"iteration": iteration + 1, "payload": payload})
        args: list[str | float] = [item, stage, iteration, state, time.time(), self.ttl_s]
        return bool(self._advance(keys=[k[0], k[1], k[2], k[7]], args=args))

    def loop_states(self, run_id: str) -> dict[str, dict[str, Any]]:
        """Loop state {iteration, payload} of every item that is looping."""
        raw = self.redis.hgetall(keys.run_loops(run_id))
        return {str(k): json.loads(v) for k, v in raw.items()}

    def item_progress(self, run_id: str, item: str) -> tuple[str | None, int]:
        """(state, current loop iteration) of one item, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(keys.run_items(run_id), item)
        pipe.hget(keys.run_loops(run_id), item)
        state, loop = pipe.execute()
        iteration = int(json.loads(loop)["iteration"]) if loop else 1
        return (None if state is None else str(state)), iteration

    def results(self, run_id: str) -> list[Any]:
        """What each root item returned, in the order the roots were given."""
        roots = self.redis.lrange(keys.run_roots(run_id), 0, -1)
        values = self.redis.hmget(keys.run_results(run_id), roots) if roots else []
        return [None if v is None else json.loads(v) for v in values]

    def pending_payloads(self, run_id: str) -> dict[str, Any]:
        """Payloads of the items not yet terminal."""
        raw = self.redis.hgetall(keys.run_payloads(run_id))
        return {str(k): json.loads(v) for k, v in raw.items()}

    def running_runs(self) -> list[tuple[str, str, float]]:
        """(run id, pipeline, time of its last progress) for every run still running."""
        ids = [str(i) for i in self.redis.zrange(keys.RUNS_INDEX, 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for run_id in ids:
            pipe.hmget(keys.run(run_id), "status", "pipeline", "progress_at")
        running = []
        for run_id, (status, pipeline, progress_at) in zip(ids, pipe.execute(), strict=True):
            if status == "running" and progress_at:
                running.append((run_id, str(pipeline), float(progress_at)))
        return running

    def touch(self, run_id: str) -> None:
        """Count as progress (the reaper just acted on this run)."""
        self.redis.hset(keys.run(run_id), "progress_at", time.time())

    def incr(self, run_id: str, stage: str, counter: str, by: int = 1) -> None:
        self.redis.hincrby(keys.run_counts(run_id), f"{stage}:{counter}", by)

    def params(self, run_id: str) -> dict[str, Any]:
        raw = self.redis.hget(keys.run(run_id), "params")
        if raw is None:
            raise KeyError(run_id)
        return dict(json.loads(str(raw)))

    def snapshot(self, run_id: str, stage_order: Iterable[str] = ()) -> RunSnapshot | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.run(run_id))
        pipe.hgetall(keys.run_counts(run_id))
        pipe.hlen(keys.run_failed(run_id))
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
        )

    def failures(self, run_id: str) -> dict[str, dict[str, Any]]:
        raw = self.redis.hgetall(keys.run_failed(run_id))
        return {str(item): json.loads(value) for item, value in raw.items()}

    def wait(self, run_id: str, timeout_s: float) -> str | None:
        """Block until the run finishes (BLPOP on its done list) or ``timeout_s`` passes."""
        done_key = keys.run_done(run_id)
        deadline = time.monotonic() + timeout_s
        while True:
            # Short slices: the client's socket timeout (redis-py: 5 s) bounds one BLPOP.
            slice_s = max(0.01, min(2.0, deadline - time.monotonic()))
            popped = self.redis.blpop([done_key], timeout=slice_s)
            if popped is not None:
                status = str(popped[1])
                self.redis.rpush(done_key, status)  # put it back for other waiters
                return status
            if time.monotonic() >= deadline:
                return None

    def latest_run(self) -> str | None:
        ids = self.redis.zrevrange(keys.RUNS_INDEX, 0, 0)
        return str(ids[0]) if ids else None
