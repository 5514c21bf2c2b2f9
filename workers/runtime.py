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
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject
from kombu.exceptions import OperationalError

from workers import claiming, looping
from workers.app import app
from workers.connections import get_redis
from workers.ledger import Ledger, RawJSON, canonical_json, item_id
from workers.looping import Loop, LoopLimitExceeded, LoopState
from workers.pipeline import Stage
from workers.publish import publish
from workers.settings import get_settings
from workers.sinks import Record, get_sink

log = logging.getLogger("fanout")

# Errors of fanout's own infrastructure: the item did not fail, the message goes back.
INFRA_ERRORS = (redis.RedisError, OperationalError)


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
    loop: LoopState = field(default_factory=LoopState)

    def map(self, stage_name: str, items: Sequence[Any]) -> int:
        """Fan out: one message per element of ``items`` for ``stage_name``."""
        from workers.pipeline import get_pipeline

        target = get_pipeline(self.stage.pipeline).stages[stage_name]
        # Each loop iteration is a parent of its own: page 2's first child is not page 1's.
        k = self.loop.iteration
        parent = self.item_id if k == 1 else f"{self.item_id}@{k}"
        return publish_children(target, self.run_id, parent, items)


def publish_children(stage: Stage, run_id: str, parent_id: str, items: Sequence[Any]) -> int:
    """Register the children in the ledger, then publish them in bulk. Returns the count."""
    texts = [RawJSON(canonical_json(item)) for item in items]
    entries = [(item_id(stage.name, parent_id, i, text), text) for i, text in enumerate(texts)]
    if not entries:
        return 0
    get_ledger().register(run_id, stage.name, entries)
    publish(stage, run_id, entries)
    return len(entries)


def record_successes(successes: Sequence[Success]) -> None:
    """Write the records of deferred successes (one sink commit per run), then move the items
    to succeeded in one ledger round trip. Records first: a counted item has its rows."""
    by_run: dict[str, list[Success]] = {}
    for success in successes:
        by_run.setdefault(success.run_id, []).append(success)
    sink = get_sink()
    for run_id, group in by_run.items():
        sink.write([r for s in group for r in s.records], run_id)
    get_ledger().finish_many([
        (s.run_id, s.stage, s.item_id, len(s.records), s.value, s.iteration) for s in successes
    ])


def _as_records(result: Any) -> list[Record]:
    if not _is_records(result):
        return []
    return [result] if isinstance(result, Record) else list(result)


def _is_records(result: Any) -> bool:
    if isinstance(result, Record):
        return True
    return isinstance(result, list | tuple) and bool(result) and all(
        isinstance(r, Record) for r in result
    )


def execute(
    task: Task, stage: Stage, run_id: str, item: str, payload: Any,
    loop_message: dict[str, Any] | None = None,
) -> str:
    """The Celery task body: run this message's item, then (``batch`` stages) a batch of
    claimed ones. Returns what happened, for the worker log and Flower."""
    attempt = int(task.request.retries or 0) + 1
    outcome = run_item(stage, run_id, item, payload, loop_message, attempt, task)
    return outcome + claiming.run_claimed(stage)


@dataclass
class Success:
    """A leaf item done but not yet recorded: a batch writes its records and moves its items
    to succeeded together (one sink commit, one round trip to the ledger)."""

    run_id: str
    stage: str
    item_id: str
    records: list[Record]
    value: Any
    iteration: int


def run_item(
    stage: Stage, run_id: str, item: str, payload: Any, loop_message: dict[str, Any] | None,
    attempt: int, task: Task | None = None, *,
    progress: tuple[str | None, int] | None = None,
    deferred: list[Success] | None = None,
) -> str:
    """Run one item (one iteration of a looping item) of ``stage``; returns what happened.

    ``progress``: the item's ledger state if the caller already read it. ``deferred``: where
    to put a plain success instead of recording it (``record_successes`` does it later)."""
    ledger = get_ledger()
    state = LoopState.from_message(loop_message)
    item_state, iteration = progress or ledger.item_progress(run_id, item)
    if item_state is None:
        log.warning("%s %s: unknown item (run expired?), dropped", stage.task_name, item)
        return "unknown"
    if item_state != "p":
        return "duplicate"
    if iteration != state.iteration:
        return "stale iteration"  # the loop has moved on; this is an old copy
    ctx = StageContext(run_id, item, stage, run_params(run_id), attempt, state)
    rows, value = 0, None
    try:
        try:
            result = stage.fn(ctx, payload)
        except Loop as signal:
            result = signal
        if isinstance(result, Loop):
            return _next_iteration(ledger, ctx, payload, result)
        if stage.maps_to:
            ctx.map(stage.maps_to, list(result or []))
        elif deferred is not None:
            records = _as_records(result)
            value = None if records else result
            deferred.append(Success(run_id, stage.name, item, records, value, state.iteration))
            return "succeeded"
        elif _is_records(result):
            rows = get_sink().write(_as_records(result), run_id)
        else:
            value = result
    except INFRA_ERRORS as exc:
        log.warning("%s %s: infrastructure error, requeued: %s", stage.task_name, item, exc)
        raise Reject(str(exc), requeue=True) from exc
    except Exception as exc:
        if attempt <= stage.retries and not isinstance(exc, LoopLimitExceeded):
            return _retry(task, ledger, ctx, payload, exc)
        failure = {
            "stage": stage.name,
            "item": payload,
            "error_type": type(exc).__name__,
            "message": str(exc)[:500],
            "attempts": attempt,
            "iteration": state.iteration,
        }
        ledger.finish(run_id, stage.name, item, "failed", failure=failure,
                      iteration=state.iteration)
        log.info("%s %s failed: %s", stage.task_name, item, exc)
        return "failed"
    ledger.finish(run_id, stage.name, item, "succeeded", rows=rows, result=value,
                  iteration=state.iteration)
    return "succeeded"


def _next_iteration(ledger: Ledger, ctx: StageContext, payload: Any, signal: Loop) -> str:
    stage, nxt = ctx.stage, ctx.loop.iteration + 1
    if nxt > stage.max_iterations:
        raise LoopLimitExceeded(
            f"{stage.task_name} looped past max_iterations={stage.max_iterations}"
        )
    if ledger.advance_loop(ctx.run_id, stage.name, ctx.item_id, ctx.loop.iteration,
                           signal.payload):
        state = LoopState(nxt, signal.payload)
        looping.schedule(ledger, stage, ctx.run_id, ctx.item_id, payload, state, signal.delay_s)
    return f"looped to iteration {nxt}"


def _retry(
    task: Task | None, ledger: Ledger, ctx: StageContext, payload: Any, exc: Exception
) -> str:
    """Run this item (this iteration) again after the stage's retry delay."""
    stage = ctx.stage
    delay_s = stage.retry_delay_for(ctx.attempt)
    ledger.incr(ctx.run_id, stage.name, "retried")
    log.info("%s %s attempt %d failed (%s), retrying in %.1fs", stage.task_name, ctx.item_id,
             ctx.attempt, exc, delay_s)
    if task is not None and stage.batch == 1 and delay_s < get_settings().visibility_timeout_s / 2:
        # Celery's own retry: Flower shows the RETRY state. Its countdown is an ETA held by
        # a worker, safe only well inside the visibility timeout.
        raise task.retry(countdown=delay_s, exc=exc, max_retries=stage.retries)
    looping.schedule_retry(ledger, stage, ctx.run_id, ctx.item_id, payload, ctx.loop,
                           delay_s, retries=ctx.attempt)
    return f"retry {ctx.attempt} scheduled"


def make_task(stage: Stage) -> Task:
    def run_item(
        self: Task, run_id: str, item_id: str, item: Any, loop: dict[str, Any] | None = None
    ) -> str:
        return execute(self, stage, run_id, item_id, item, loop)

    run_item.__name__ = stage.name
    run_item.__qualname__ = stage.task_name
    task: Task = app.task(name=stage.task_name, bind=True)(run_item)
    return task
