"""The reaper: publishes again the items whose message was lost.

Why it exists: kombu's Redis transport pops a message (BRPOP) and only then records it as
unacked; a worker SIGKILLed in between loses that message. The ledger still has the item
pending with its payload, so a run that has made no progress for a visibility timeout is
checked: every pending item that is neither on a queue nor unacked is published again.
A duplicate (say, of a message that was in that window) is harmless: the item id makes it
count once. One worker at a time sweeps (a Redis lock).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import redis

from workers import claiming, keys, looping
from workers.ledger import Ledger

log = logging.getLogger("fanout.reaper")

#: kombu's Redis transport keeps unacked messages in this hash (its default ``unacked_key``).
KOMBU_UNACKED = "unacked"


def _task_id(envelope: dict[str, Any]) -> str:
    return str(envelope.get("headers", {}).get("id", ""))


def in_flight_items(
    ledger: Ledger, broker: redis.Redis, run_id: str, queues: Iterable[str]
) -> set[str]:
    """Item ids of ``run_id`` that have a message on a queue, claimed or unacked somewhere,
    or waiting in the delayed set."""
    client = broker
    queued = [raw for q in queues for raw in client.lrange(q, 0, -1)]
    queued += [raw for q in queues for raw in claiming.claimed_messages(client, q)]
    task_ids = [_task_id(json.loads(raw)) for raw in queued]
    task_ids += [_task_id(json.loads(raw)[0]) for raw in client.hvals(KOMBU_UNACKED)]
    found = {looping.item_of_task_id(t)[1] for t in task_ids if t.startswith(f"{run_id}.")}
    return found | looping.delayed_items(ledger, run_id)


def sweep(ledger: Ledger, stall_s: float, now: float | None = None) -> int:
    """Republish the lost items of every run stalled for ``stall_s``. Returns how many."""
    from workers.pipeline import get_pipeline
    from workers.publish import publish

    broker = claiming.broker_client()
    if broker is None:
        return 0  # not a Redis broker: no pop-before-unacked gap, and no queue to scan
    now = time.time() if now is None else now
    restore_claimed(broker, now - stall_s)
    republished = 0
    for run_id, pipeline_name, progress_at in ledger.running_runs():
        if now - progress_at < stall_s:
            continue
        pending = ledger.pending_payloads(run_id)
        loops = ledger.loop_states(run_id)
        pipeline = get_pipeline(pipeline_name)
        queues = [stage.queue for stage in pipeline.stages.values()]
        flying = in_flight_items(ledger, broker, run_id, queues)
        lost: dict[str, list[tuple[str, Any]]] = defaultdict(list)
        for item, payload in pending.items():
            if item not in flying:
                lost[item.split(":", 1)[0]].append((item, payload))
        for stage_name, entries in lost.items():
            log.warning("run %s: publishing %d lost %s items again", run_id, len(entries),
                        stage_name)
            for item, payload in entries:  # a looping item resumes at its current iteration
                state = looping.LoopState.from_message(loops.get(item))
                publish(pipeline.stages[stage_name], run_id, [(item, payload)], loop=state)
            republished += len(entries)
        ledger.touch(run_id)
    return republished


def restore_claimed(broker: redis.Redis, claimed_before: float) -> int:
    """Put back batch-claimed messages whose worker died before releasing them."""
    from workers.pipeline import all_pipelines

    restored = 0
    for pipeline in all_pipelines():
        for stage in pipeline.stages.values():
            if stage.batch > 1:
                restored += claiming.restore(broker, stage.queue, claimed_before)
    if restored:
        log.warning("put %d claimed messages back on their queues", restored)
    return restored


def _loop(interval_s: float, stall_s: float) -> None:
    from workers.runtime import get_ledger

    owner = f"{socket.gethostname()}:{os.getpid()}"
    while True:
        time.sleep(interval_s)
        try:
            ledger = get_ledger()
            if ledger.redis.set(keys.REAPER_LOCK, owner, nx=True, ex=max(1, int(interval_s))):
                sweep(ledger, stall_s)
        except Exception:  # the reaper must outlive a Redis hiccup
            log.exception("reaper sweep failed")


def start(visibility_timeout_s: int) -> threading.Thread:
    """Sweep a few times per visibility timeout, in a daemon thread of the worker."""
    interval_s = max(1.0, min(30.0, visibility_timeout_s / 3))
    thread = threading.Thread(
        target=_loop, args=(interval_s, float(visibility_timeout_s)), name="fanout-reaper",
        daemon=True,
    )
    thread.start()
    return thread
