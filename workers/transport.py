"""The transport boundary: how deliveries reach the broker, and what the engine may ask of it.

``RedisTransport`` is the fast path on a Redis broker: lean messages built by
``message.encode_redis`` and LPUSHed in bulk (one round trip per 1,000), claims of queued
messages for batched consumption (``lua/claim.lua``: each claim names its worker, and goes
back when that worker dies, ``lua/restore_claimed.lua``), and queue depths. ``KombuTransport``
serves any other broker (RabbitMQ) through kombu's own producer with the same headers and
body, and has no claims. Nothing above this module reads a queue's raw layout.

Fair share between runs (Redis only): a stage queue is ``keys.LANES`` lists, kombu's own
priority steps of it, so Celery's consumer pops from all of them and Flower counts them all.
Each run publishes into a lane of its own while one is free (``lua/publish.lua``), and a
claim takes from every lane that waits, weighted by its run's priority (``lua/claim.lua``):
a 500-item run queued behind a 60,000-item one is run beside it, not after it. One run alone
uses lane 0, kombu's plain list, as before. A message put back (a dead worker's claim, a
batch given back) goes to lane 0, at the consuming end. On RabbitMQ queues stay FIFO.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Protocol

import redis
from kombu import Connection, Exchange, Queue
from kombu.pools import producers

from workers import keys, scripts
from workers.connections import check_reachable
from workers.liveness import worker_id
from workers.message import CONTENT_TYPE, Delivery, encode_redis
from workers.redact import redact
from workers.settings import ConfigError

log = logging.getLogger("fanout.transport")

_PUBLISH_CHUNK = 1000


class Transport(Protocol):
    def publish(self, deliveries: Sequence[Delivery]) -> None:
        """Put each delivery on its stage's queue."""

    def set_priority(self, run_id: str, priority: int) -> None:
        """The run's weight in the fair share of every stage queue, before it publishes."""

    def priority(self, run_id: str) -> int:
        """The run's weight (``set_priority``), 1 when unset."""

    def claim(self, queue: str, count: int, share: int = 1) -> list[str]:
        """Take up to ``count`` raw messages off ``queue`` to run in a batch, recorded as
        claimed by this worker until ``release``; [] where the broker cannot. ``share``: the
        threads that compete for the queue; no more than its length / ``share`` is taken."""

    def release(self, queue: str, raws: Sequence[str]) -> None:
        """The claimed messages are done (or dead-lettered)."""

    def give_back(self, queue: str, raws: Sequence[str]) -> int:
        """Put claimed messages back on ``queue`` now: their batch could not be recorded (an
        infrastructure error), and the items must run again. Returns how many went back."""

    def restore_claims(
        self, queues: Sequence[str], claimed_before: float = 0.0, dead: Sequence[str] = ()
    ) -> int:
        """Put back the messages claimed by the ``dead`` workers, and those claimed before
        ``claimed_before`` (server time: the start of a restarted Redis). Returns how many."""

    def claimed_messages(self, queues: Sequence[str]) -> list[str]:
        """The raw messages claimed on ``queues`` and not yet released."""

    def settle(self) -> int:
        """Release or give back now what Redis could not take when asked (it was down).
        Returns how many messages were settled."""

    def queue_depth(self, queue: str) -> int:
        """Messages waiting on ``queue``, claimed ones included."""


class RedisTransport:
    def __init__(
        self, client: redis.Redis, ttl_s: int, owner: Callable[[], str] = worker_id
    ) -> None:
        """``owner``: the id of the worker claiming (this process's, by default)."""
        self.redis = client
        self.ttl_s = ttl_s
        self.owner = owner
        # (queue, messages, give back?) that Redis refused: a live worker's claims are never
        # put back by anyone else, so it settles them itself once Redis answers (``settle``).
        self._owed: list[tuple[str, list[str], bool]] = []
        self._owed_lock = threading.Lock()
        self._claim = scripts.load("claim")
        self._publish = scripts.load("publish")
        self._restore = scripts.load("restore_claimed")
        self._give_back = scripts.load("give_back")

    def publish(self, deliveries: Sequence[Delivery]) -> None:
        by_lane: dict[tuple[str, str], list[str]] = defaultdict(list)
        for delivery in deliveries:
            by_lane[(delivery.queue, delivery.run_id)].append(encode_redis(delivery))
        pipe = self.redis.pipeline(transaction=False)
        for (queue, run_id), messages in by_lane.items():
            lane_keys = _lane_keys(queue, run_id)
            for start in range(0, len(messages), _PUBLISH_CHUNK):
                # In the run's lane (lua/publish.lua), LPUSHed: kombu consumes with BRPOP.
                self._publish(self.redis, lane_keys,
                              [run_id, self.ttl_s, *messages[start : start + _PUBLISH_CHUNK]],
                              pipe=pipe)
                if len(pipe) >= 8:
                    pipe.execute()
        if len(pipe):
            pipe.execute()

    def set_priority(self, run_id: str, priority: int) -> None:
        self.redis.set(keys.run_priority(run_id), priority, ex=self.ttl_s)

    def priority(self, run_id: str) -> int:
        raw = self.redis.get(keys.run_priority(run_id))
        return int(raw) if raw is not None and str(raw).isdigit() else 1

    def claim(self, queue: str, count: int, share: int = 1) -> list[str]:
        owner = self.owner()
        keys_ = {**_lane_keys(queue), "claimed": keys.claimed(queue),
                 "claimers": keys.claimers(queue), "workers": keys.WORKERS,
                 "worker_queues": keys.worker_queues(owner)}
        taken = self._claim(self.redis, keys_, [count, owner, self.ttl_s, share])
        return [str(m) for m in taken]

    def release(self, queue: str, raws: Sequence[str]) -> None:
        if raws:
            self._settling(queue, list(raws), back=False)

    def give_back(self, queue: str, raws: Sequence[str]) -> int:
        return self._settling(queue, list(raws), back=True) if raws else 0

    def settle(self) -> int:
        with self._owed_lock:
            owed, self._owed = self._owed, []
        settled = 0
        for n, (queue, raws, back) in enumerate(owed):
            try:
                self._settle(queue, raws, back)
            except redis.RedisError:
                with self._owed_lock:
                    self._owed[:0] = owed[n:]
                break
            settled += len(raws)
        return settled

    def _settling(self, queue: str, raws: list[str], back: bool) -> int:
        try:
            return self._settle(queue, raws, back)
        except redis.RedisError:
            with self._owed_lock:
                self._owed.append((queue, raws, back))
            raise

    def _settle(self, queue: str, raws: list[str], back: bool) -> int:
        if back:  # only those still claimed: one the reaper restored is not doubled
            return int(self._give_back(self.redis, self._claim_keys(queue), raws))
        pipe = self.redis.pipeline()  # MULTI: a claim is in both or in neither
        pipe.zrem(keys.claimed(queue), *raws)
        pipe.hdel(keys.claimers(queue), *raws)
        pipe.execute()
        return len(raws)

    def restore_claims(
        self, queues: Sequence[str], claimed_before: float = 0.0, dead: Sequence[str] = ()
    ) -> int:
        restored = 0
        for queue in queues:
            restored += int(self._restore(self.redis, self._claim_keys(queue),
                                          [claimed_before, *dead]))
        return restored

    def claimed_messages(self, queues: Sequence[str]) -> list[str]:
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.zrange(keys.claimed(queue), 0, -1)
        return [str(m) for found in pipe.execute() for m in found]

    @staticmethod
    def _claim_keys(queue: str) -> dict[str, str]:
        return {"claimed": keys.claimed(queue), "claimers": keys.claimers(queue),
                "queue": queue}

    def queue_depth(self, queue: str) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for lane in keys.queue_lanes(queue):  # read first: a claim moves lane -> claimed
            pipe.llen(lane)
        pipe.zcard(keys.claimed(queue))
        return sum(int(n) for n in pipe.execute())


def _lane_keys(queue: str, run_id: str | None = None) -> dict[str, str]:
    """The key names ``lua/publish.lua`` and ``lua/claim.lua`` take for ``queue``'s lanes
    (and ``run_id``'s priority)."""
    named = {f"lane{n}": lane for n, lane in enumerate(keys.queue_lanes(queue))}
    named.update(queue=queue, map=keys.lane_map(queue))
    if run_id is not None:
        named["priority"] = keys.run_priority(run_id)
    return named


class KombuTransport:
    """Any broker kombu speaks (RabbitMQ): kombu's producer pool, no claims."""

    def __init__(self, broker_url: str) -> None:
        self.url = broker_url
        self._connection = Connection(broker_url)
        self._queues: dict[str, Queue] = {}

    def _queue(self, name: str) -> Queue:
        # The declaration Celery's worker makes: durable, on the default exchange.
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = Queue(name, Exchange(""), routing_key=name)
        return queue

    def publish(self, deliveries: Sequence[Delivery]) -> None:
        with producers[self._connection].acquire(block=True) as producer:
            for delivery in deliveries:
                producer.publish(
                    delivery.body(), exchange="", routing_key=delivery.queue,
                    headers=delivery.headers(), content_type=CONTENT_TYPE,
                    content_encoding="utf-8", delivery_mode=2,
                    declare=[self._queue(delivery.queue)], retry=True,
                )

    def set_priority(self, run_id: str, priority: int) -> None:
        return None  # RabbitMQ's queues stay FIFO

    def priority(self, run_id: str) -> int:
        return 1

    def claim(self, queue: str, count: int, share: int = 1) -> list[str]:
        return []

    def release(self, queue: str, raws: Sequence[str]) -> None:
        return None

    def give_back(self, queue: str, raws: Sequence[str]) -> int:
        return 0

    def restore_claims(
        self, queues: Sequence[str], claimed_before: float = 0.0, dead: Sequence[str] = ()
    ) -> int:
        return 0

    def claimed_messages(self, queues: Sequence[str]) -> list[str]:
        return []

    def settle(self) -> int:
        return 0

    def queue_depth(self, queue: str) -> int:
        with Connection(self.url) as connection, connection.channel() as channel:
            try:
                return int(channel.queue_declare(queue=queue, passive=True).message_count)
            except connection.channel_errors:
                return 0  # never declared: nothing waits on it


def check_broker(url: str) -> None:
    """Raise ConfigError (one clear line) when the broker at ``url`` does not answer."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        check_reachable(url)
        return
    try:
        with Connection(url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:  # kombu raises the transport's own errors
        raise ConfigError(f"cannot reach the broker at {redact(url)}: {exc}") from None


def open_transport(broker_url: str, client: redis.Redis | None, ttl_s: int) -> Transport:
    """The Redis fast path when the broker is Redis (``client`` is then its client)."""
    if client is not None and broker_url.startswith(("redis://", "rediss://", "unix://")):
        return RedisTransport(client, ttl_s)
    return KombuTransport(broker_url)
