"""Looping tasks (Prefect 1's ``LOOP`` signal): a stage returns or raises ``Loop(payload)``
and fanout enqueues the same item again with that payload and the next iteration number.

Each iteration is its own message (task id ``RUN.ITEM.K``) with its own retries, so a retry
re-runs one iteration, never the earlier ones. The ledger moves an item from iteration k to
k+1 exactly once (``lua/advance_loop.lua``) and keeps the payload, so a duplicate of an old
iteration is recognised and skipped, and a lost message can be published again.

Delays never ride on broker ETAs (a countdown longer than the visibility timeout would be
delivered twice by Redis): a delayed iteration waits in the ``fanout:delayed`` sorted set and
a mover thread in every worker publishes it when due.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import redis

from workers import keys

if TYPE_CHECKING:
    from workers.ledger import Ledger
    from workers.pipeline import Stage

log = logging.getLogger("fanout.looping")

DEFAULT_MAX_ITERATIONS = 1000
_MOVER_INTERVAL_S = 0.2
_MOVER_BATCH = 500


class Loop(Exception):
    """Return or raise this from a stage to run the same item again with ``payload``."""

    def __init__(self, payload: Any = None, delay_s: float = 0.0, message: str = "") -> None:
        super().__init__(message or f"loop with payload {payload!r}")
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        self.payload = payload
        self.delay_s = float(delay_s)


class LoopLimitExceeded(Exception):
    """An item looped more than its stage's ``max_iterations``."""


@dataclass(frozen=True)
class LoopState:
    """What a looping stage reads: ``ctx.loop.payload`` and ``ctx.loop.iteration`` (from 1)."""

    iteration: int = 1
    payload: Any = None

    def as_message(self) -> dict[str, Any] | None:
        if self.iteration == 1:
            return None
        return {"iteration": self.iteration, "payload": self.payload}

    @classmethod
    def from_message(cls, raw: dict[str, Any] | None) -> LoopState:
        if not raw:
            return cls()
        return cls(int(raw["iteration"]), raw.get("payload"))


def task_id(run_id: str, item_id: str, iteration: int) -> str:
    """``RUN.ITEM`` for the first iteration, ``RUN.ITEM.K`` after it."""
    return f"{run_id}.{item_id}" if iteration == 1 else f"{run_id}.{item_id}.{iteration}"


def item_of_task_id(task: str) -> tuple[str, str]:
    """(run id, item id) of a task id made by ``task_id``."""
    run_id, item_id = task.split(".")[:2]
    return run_id, item_id


def schedule(
    ledger: Ledger, stage: Stage, run_id: str, item_id: str, item: Any, state: LoopState,
    delay_s: float,
) -> None:
    """Enqueue the next iteration now, or after ``delay_s`` through the delayed set."""
    schedule_retry(ledger, stage, run_id, item_id, item, state, delay_s, retries=0)


def schedule_retry(
    ledger: Ledger, stage: Stage, run_id: str, item_id: str, item: Any, state: LoopState,
    delay_s: float, *, retries: int,
) -> None:
    """Enqueue (iteration ``state`` of) an item after ``delay_s``, as attempt ``retries + 1``."""
    from workers.publish import publish

    if delay_s <= 0:
        publish(stage, run_id, [(item_id, item)], loop=state, retries=retries)
        return
    member = json.dumps({
        "task": stage.task_name, "run_id": run_id, "item_id": item_id, "item": item,
        "loop": state.as_message(), "retries": retries,
    }, sort_keys=True)
    pipe = ledger.redis.pipeline(transaction=False)
    pipe.zadd(keys.DELAYED, {member: time.time() + delay_s})
    pipe.expire(keys.DELAYED, ledger.ttl_s)
    pipe.execute()


def delayed_items(ledger: Ledger, run_id: str) -> set[str]:
    """Item ids of ``run_id`` waiting in the delayed set (the reaper counts them in flight)."""
    found = set()
    for raw in ledger.redis.zrange(keys.DELAYED, 0, -1):
        entry = json.loads(str(raw))
        if entry["run_id"] == run_id:
            found.add(str(entry["item_id"]))
    return found


def move_due(ledger: Ledger, now: float | None = None) -> int:
    """Publish the delayed iterations that are due. Returns how many."""
    from workers.pipeline import find_stage
    from workers.publish import publish

    now = time.time() if now is None else now
    due = _pop_due_script(ledger.redis)(keys=[keys.DELAYED], args=[now, _MOVER_BATCH])
    for raw in due:
        entry = json.loads(raw)
        stage = find_stage(entry["task"])
        state = LoopState.from_message(entry["loop"])
        publish(stage, entry["run_id"], [(entry["item_id"], entry["item"])], loop=state,
                retries=int(entry.get("retries", 0)))
    return len(due)


def _mover_loop() -> None:
    from workers.runtime import get_ledger

    while True:
        time.sleep(_MOVER_INTERVAL_S)
        try:
            while move_due(get_ledger()) == _MOVER_BATCH:
                pass
        except Exception:  # keep moving after a Redis hiccup; the reaper covers a loss
            log.exception("moving delayed iterations failed")


def start_mover() -> threading.Thread:
    thread = threading.Thread(target=_mover_loop, name="fanout-delayed-mover", daemon=True)
    thread.start()
    return thread


@functools.cache
def _pop_due_script(client: redis.Redis) -> Any:
    source = resources.files("workers").joinpath("lua", "pop_due.lua").read_text()
    return client.register_script(source)
