"""Batched consumption of leaf messages: one Celery task runs several items of its stage.

Every item stays its own message, but Celery's per-message cost (delivery, unacked
bookkeeping, three task events, the trace) was most of a leaf's CPU. A stage declared with
``batch=N`` has each of its tasks also claim up to N-1 more messages of its queue
(``lua/claim.lua``: popped and recorded as claimed in one step) and run them one after
another in the same thread; other threads do the same, so concurrency is unchanged.

Delivery stays at-least-once: a claimed message is released only after its item is done;
if the worker dies first, the reaper puts messages claimed longer than the visibility
timeout back on their queue, as kombu does for unacked ones. Flower shows the task that
carried the batch (its result counts the batch); ``fanout status`` counts every item.
"""

from __future__ import annotations

import base64
import functools
import json
import time
from collections import Counter
from importlib import resources
from typing import TYPE_CHECKING, Any

import redis

from workers import keys

if TYPE_CHECKING:
    from workers.pipeline import Stage


@functools.cache
def _script(client: redis.Redis, name: str) -> Any:
    return client.register_script(resources.files("workers").joinpath("lua", name).read_text())


def broker_client() -> redis.Redis | None:
    """The broker's Redis, or None when the broker is not Redis (batches are then off)."""
    from workers.app import app
    from workers.connections import broker_redis

    return broker_redis(app.conf.broker_url)


def claim(client: redis.Redis, queue: str, count: int, ttl_s: int) -> list[str]:
    taken = _script(client, "claim.lua")(
        keys=[queue, keys.claimed(queue)], args=[count, time.time(), ttl_s]
    )
    return [str(m) for m in taken]


def restore(client: redis.Redis, queue: str, claimed_before: float) -> int:
    """Put back messages claimed before ``claimed_before`` and never released."""
    return int(_script(client, "restore_claimed.lua")(
        keys=[keys.claimed(queue), queue], args=[claimed_before]
    ))


def claimed_messages(client: redis.Redis, queue: str) -> list[str]:
    return [str(m) for m in client.zrange(keys.claimed(queue), 0, -1)]


def decode(message: str) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    """(headers, args, kwargs) of a Celery protocol-2 message as kombu stores it."""
    envelope = json.loads(message)
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body).decode()
    args, kwargs, _ = json.loads(body)
    return envelope["headers"], args, kwargs


def run_claimed(stage: Stage) -> str:
    """Claim up to ``stage.batch - 1`` more messages of the stage and run them here."""
    from workers.runtime import Success, get_ledger, record_successes, run_item

    client = broker_client()
    if client is None or stage.batch <= 1:
        return ""
    messages = claim(client, stage.queue, stage.batch - 1, get_ledger().ttl_s)
    if not messages:
        return ""
    decoded = [decode(message) for message in messages]
    progress = get_ledger().progress_many([(args[0], args[1]) for _, args, _ in decoded])
    outcomes: Counter[str] = Counter()
    successes: list[Success] = []
    seen: set[tuple[str, str, int]] = set()
    for (headers, args, kwargs), item_progress in zip(decoded, progress, strict=True):
        run_id, item_id, payload = args
        copy_of = (run_id, item_id, int((kwargs.get("loop") or {}).get("iteration", 1)))
        if copy_of in seen:  # two copies of one message in this batch: run it once
            outcomes["duplicate"] += 1
            continue
        seen.add(copy_of)
        attempt = int(headers.get("retries") or 0) + 1
        outcome = run_item(stage, run_id, item_id, payload, kwargs.get("loop"), attempt,
                           progress=item_progress, deferred=successes)
        outcomes[outcome.split(" ")[0]] += 1
    record_successes(successes)
    client.zrem(keys.claimed(stage.queue), *messages)
    return f"; batch of {len(messages)} more: " + ", ".join(
        f"{n} {what}" for what, n in sorted(outcomes.items())
    )
