"""Items of a run: registered pending before they are published, moved to a terminal state
exactly once (``lua/finish_item.lua``; the last one ends the run), and what happens to them
on the way (retries, throttles, failed tries)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis

from workers import scripts
from workers.ids import canonical_json
from workers.keys import RunKeys
from workers.ledger.calls import call, flat_pairs
from workers.ledger.records import Finish, MapSignal

log = logging.getLogger("fanout.ledger")

# Lua's register call takes its ids as ARGV; chunks keep one call's memory bounded.
_REGISTER_CHUNK = 5000
# finish_item.lua's code for an item it never registered (the reply is per item, not an
# error: the other items of the call are counted).
_NOITEM = -1


class Items:
    """Register, finish and count the items of runs. Every method is one round trip (or one
    per run of a batch)."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._register = scripts.load("register_items")
        self._finish = scripts.load("finish_item")

    def register(self, run_id: str, stage: str, entries: Sequence[tuple[str, Any]],
                 fan_out: str = "") -> int | None:
        """Register children (id, payload) as pending before they are published.
        Returns how many were new, or None when the fan-out named ``fan_out`` (a digest) was
        published already (``published``): then nothing is to be published again.
        ``LedgerError`` NORUN: the run is unknown or expired."""
        new = 0
        for start in range(0, len(entries), _REGISTER_CHUNK):
            chunk = entries[start : start + _REGISTER_CHUNK]
            digest = fan_out if start == 0 else ""
            args = [stage, self.ttl_s, time.time(), digest, *flat_pairs(chunk)]
            registered = int(call(self._register, self.redis, run_id, args))
            if registered < 0:
                return None
            new += registered
        return new

    def published(self, run_id: str, fan_out: str) -> None:
        """Note that the fan-out named ``fan_out`` is on the broker (see ``register``)."""
        fanned = RunKeys.of(run_id).fanned
        pipe = self.redis.pipeline(transaction=False)
        pipe.sadd(fanned, fan_out)
        pipe.expire(fanned, self.ttl_s)
        pipe.execute()

    def finish(self, done: Finish) -> int:
        """One terminal transition: 0 duplicate (or a stale loop iteration), 1 counted,
        2 counted and the run finished, -1 never registered (logged)."""
        return self.finish_batch([done])[0][0]

    def finish_batch(self, done: Sequence[Finish]) -> tuple[list[int], list[MapSignal]]:
        """Terminal transitions of many items, each exactly once (codes as ``finish``), and
        what the batch maps of these items ask the engine to do. One script call per run (a
        claimed batch is nearly always one run)."""
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
            replies = call(self._finish, self.redis, run_id, args)
            for n, index in enumerate(indexes):
                code, map_id, deciding = replies[3 * n : 3 * n + 3]
                codes[index] = int(code)
                if code == _NOITEM:
                    log.error("run %s: NOITEM item %s was never registered: finish refused",
                              run_id, done[index].item_id)
                elif map_id:
                    signals.append(MapSignal(run_id, str(map_id), bool(int(deciding))))
        return codes, signals

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

    def pending_payloads(self, run_id: str) -> dict[str, Any]:
        """Payloads of the items not yet terminal (the reaper publishes lost ones again)."""
        raw = self.redis.hgetall(RunKeys.of(run_id).payloads)
        return {str(k): json.loads(v) for k, v in raw.items()}
