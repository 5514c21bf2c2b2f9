"""Dead letters: messages on fanout's queues that could not be decoded, set aside with why.

A message that is not a fanout delivery (not JSON, not kombu's envelope, an unknown task, a
content type other than JSON, arguments of another shape) must neither kill the worker that
takes it nor be lost: it is acknowledged, kept here with its raw body and the reason, and
logged once. ``fanout dead-letters`` lists them. Keys: ``keys.dead_letters(QUEUE)`` (a list per
queue) and ``keys.DEAD_QUEUES``; both expire with the ledger TTL, refreshed on each add.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis

from workers import keys

log = logging.getLogger("fanout.dead_letters")

_RAW_CHARS = 65_536  # a larger body is cut; the reason says what it was


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    reason: str
    raw: str
    at: float

    def as_json(self) -> dict[str, Any]:
        return {"queue": self.queue, "reason": self.reason, "raw": self.raw, "at": self.at}


class DeadLetters:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s

    def add(self, queue: str, raw: str | bytes, reason: str) -> None:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        entry = json.dumps({"reason": reason, "raw": text[:_RAW_CHARS], "at": time.time()})
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(keys.dead_letters(queue), entry)
        pipe.expire(keys.dead_letters(queue), self.ttl_s)
        pipe.sadd(keys.DEAD_QUEUES, queue)
        pipe.expire(keys.DEAD_QUEUES, self.ttl_s)
        pipe.execute()
        log.warning("dead letter on %s: %s (fanout dead-letters)", queue, reason)

    def list(self) -> list[DeadLetter]:
        found = []
        for queue in sorted(str(q) for q in self.redis.smembers(keys.DEAD_QUEUES)):
            for raw in self.redis.lrange(keys.dead_letters(queue), 0, -1):
                entry = json.loads(raw)
                found.append(DeadLetter(queue, entry["reason"], entry["raw"], entry["at"]))
        return found

    def purge(self) -> int:
        queues = [str(q) for q in self.redis.smembers(keys.DEAD_QUEUES)]
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(keys.dead_letters(queue))
        counts = pipe.execute() if queues else []
        self.redis.delete(keys.DEAD_QUEUES, *(keys.dead_letters(q) for q in queues))
        return int(sum(counts))
