"""Delayed work: loop iterations with a delay, retries, throttled items.

Delays never ride on broker ETAs (a countdown longer than the visibility timeout would be
delivered twice by Redis): a delayed delivery waits in the ``fanout:delayed`` sorted set, and a
mover thread in every worker publishes what is due (``lua/pop_due.lua`` takes it atomically,
so two movers never publish one twice). Each run's delayed items are also indexed by run
(``RunKeys.delayed``), so the reaper knows they are not lost. Time comes from ``clock``, so
tests move it instead of sleeping. While Redis is down the mover backs off and says so once
(``workers/outage.py``); what was due meanwhile moves when Redis is back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from workers import keys, scripts
from workers.keys import RunKeys
from workers.message import BadMessage, Delivery
from workers.outage import DOWN_ERRORS
from workers.outage import shared as shared_outage
from workers.transport import Transport

log = logging.getLogger("fanout.scheduler")

MOVER_INTERVAL_S = 0.2
MOVER_BATCH = 500


class Scheduler:
    def __init__(
        self, client: redis.Redis, transport: Transport, ttl_s: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = client
        self.transport = transport
        self.ttl_s = ttl_s
        self.clock = clock
        self._pop_due = scripts.load("pop_due")

    def later(self, delivery: Delivery, delay_s: float) -> None:
        """Publish ``delivery`` after ``delay_s`` (now, when it is 0)."""
        if delay_s <= 0:
            self.transport.publish([delivery])
            return
        due = self.clock() + delay_s
        index = RunKeys.of(delivery.run_id).delayed
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(index, {delivery.item_id: due})  # first: never delayed yet unindexed
        pipe.expire(index, self.ttl_s)
        pipe.zadd(keys.DELAYED, {delivery.to_json(): due})
        pipe.expire(keys.DELAYED, self.ttl_s)
        pipe.execute()

    def move_due(self) -> int:
        """Publish the delayed deliveries that are due. Returns how many were taken."""
        now = self.clock()
        due = self._pop_due(self.redis, {"delayed": keys.DELAYED}, [now, MOVER_BATCH])
        deliveries = []
        for raw in due:
            try:
                deliveries.append(Delivery.from_json(raw))
            except BadMessage as exc:  # only fanout writes this set
                log.error("dropped a malformed delayed entry: %s", exc.reason)
        self.transport.publish(deliveries)
        pipe = self.redis.pipeline(transaction=False)
        for run_id in {d.run_id for d in deliveries}:
            pipe.zremrangebyscore(RunKeys.of(run_id).delayed, "-inf", now)
        pipe.execute()
        return len(due)

    def waiting_items(self, run_id: str, due_after: float) -> set[str]:
        """Items of ``run_id`` with a delivery due after ``due_after`` (older index entries
        are leftovers of a mover that died between its two steps)."""
        index = RunKeys.of(run_id).delayed
        return {str(i) for i in self.redis.zrangebyscore(index, due_after, "+inf")}


def start_mover(scheduler: Scheduler, interval_s: float = MOVER_INTERVAL_S) -> threading.Thread:
    """Move due work every ``interval_s`` in a daemon thread. While Redis is down it waits
    longer between tries (``workers/outage.py``), and says so once per outage."""
    outage = shared_outage(scheduler.redis)

    def loop() -> None:
        delay_s = interval_s
        while True:
            time.sleep(delay_s)
            delay_s = interval_s
            try:
                while scheduler.move_due() == MOVER_BATCH:
                    pass
                outage.ok()
            except DOWN_ERRORS as exc:
                delay_s = max(interval_s, outage.failed(exc))
            except Exception:  # keep moving after any other error; the reaper covers a loss
                log.exception("moving delayed work failed")

    thread = threading.Thread(target=loop, name="fanout-scheduler", daemon=True)
    thread.start()
    return thread
