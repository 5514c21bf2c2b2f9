"""What happens when a worker runs one item: the thin Celery task and its bookkeeping.

Order matters for at-least-once delivery with exactly-once accounting:
1. an item already terminal in the ledger is a duplicate delivery: skip it;
2. run the stage function (the vendor call);
3. register and publish its children, or write its records to the sink;
4. only then move the item to its terminal state (Lua), which may finish the run.
A worker killed anywhere before 4 leaves the item pending; its message comes back and
steps 2-3 are repeated, which is harmless: registration and the sink are idempotent.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject
from kombu.exceptions import OperationalError

from workers.app import app
from workers.connections import get_redis
from workers.ledger import Ledger, item_id
from workers.pipeline import Stage
from workers.settings import get_settings
from workers.sinks import Record, get_sink

log = logging.getLogger("fanout")

# Errors of fanout's own infrastructure: the item did not fail, the message goes back.
INFRA_ERRORS = (redis.RedisError, OperationalError)
_PUBLISH_BATCH_COMMANDS = 2000


@functools.cache
def _ledger_for(pid: int) -> Ledger:
    return Ledger(get_redis(), get_settings().ledger_ttl_s)


def get_ledger() -> Ledger:
    return _ledger_for(os.getpid())


_params_cache: dict[str, dict[str, Any]] = {}
_params_lock = threading.Lock()


def run_params(run_id: str) -> dict[str, Any]:
    """Run parameters, read from the ledger once per process (messages stay lean)."""
    params = _params_cache.get(run_id)
    if params is None:
        params = get_ledger().params(run_id)
        with _params_lock:
            if len(_params_cache) > 256:
                _params_cache.clear()
            _params_cache[run_id] = params
    return params


@dataclass
class StageContext:
    """What a stage function may use besides its item."""

    run_id: str
    item_id: str
    stage: Stage
    params: dict[str, Any]
    attempt: int = 1

    def map(self, stage_name: str, items: Sequence[Any]) -> int:
        """Fan out: one message per element of ``items`` for ``stage_name``."""
        from workers.pipeline import get_pipeline

        target = get_pipeline(self.stage.pipeline).stages[stage_name]
        return publish_children(target, self.run_id, self.item_id, items)


def publish_children(stage: Stage, run_id: str, parent_id: str, items: Sequence[Any]) -> int:
    """Register the children in the ledger, then publish them in bulk. Returns the count."""
    entries = [(item_id(stage.name, parent_id, i, item), item) for i, item in enumerate(items)]
    if not entries:
        return 0
    get_ledger().register(run_id, stage.name, entries)
    publish(stage, run_id, entries)
    return len(entries)


def publish(stage: Stage, run_id: str, entries: Sequence[tuple[str, Any]]) -> None:
    """Publish already-registered items: one Redis pipeline per batch, not a round trip each."""
    task = stage.task
    assert task is not None
    with app.producer_or_acquire() as producer, producer.batch(max_size=_PUBLISH_BATCH_COMMANDS):
        for child_id, item in entries:
            task.apply_async(
                (run_id, child_id, item),
                producer=producer,
                task_id=f"{run_id}.{child_id}",
            )


def _records(result: Any) -> list[Record]:
    if result is None:
        return []
    if isinstance(result, Record):
        return [result]
    records = list(result)
    for record in records:
        if not isinstance(record, Record):
            raise TypeError(f"a leaf stage must return Records, got {type(record).__name__}")
    return records


def execute(task: Task, stage: Stage, run_id: str, item: str, payload: Any) -> str:
    """Run one item of ``stage``; returns what happened, for the worker log and Flower."""
    ledger = get_ledger()
    if ledger.is_terminal(run_id, item):
        return "duplicate"
    attempt = int(task.request.retries or 0) + 1
    ctx = StageContext(run_id, item, stage, run_params(run_id), attempt)
    rows = 0
    try:
        result = stage.fn(ctx, payload)
        if stage.maps_to:
            ctx.map(stage.maps_to, list(result or []))
        else:
            rows = get_sink().write(_records(result), run_id)
    except INFRA_ERRORS as exc:
        log.warning("%s %s: infrastructure error, requeued: %s", stage.task_name, item, exc)
        raise Reject(str(exc), requeue=True) from exc
    except Exception as exc:
        failure = {
            "stage": stage.name,
            "item": payload,
            "error_type": type(exc).__name__,
            "message": str(exc)[:500],
            "attempts": attempt,
        }
        ledger.finish(run_id, stage.name, item, "failed", failure=failure)
        log.info("%s %s failed: %s", stage.task_name, item, exc)
        return "failed"
    ledger.finish(run_id, stage.name, item, "succeeded", rows=rows)
    return "succeeded"


def make_task(stage: Stage) -> Task:
    def run_item(self: Task, run_id: str, item_id: str, item: Any) -> str:
        return execute(self, stage, run_id, item_id, item)

    run_item.__name__ = stage.name
    run_item.__qualname__ = stage.task_name
    task: Task = app.task(name=stage.task_name, bind=True)(run_item)
    return task
