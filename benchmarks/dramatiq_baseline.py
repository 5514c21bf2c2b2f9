"""The Dramatiq baseline: the same three-stage shape on Dramatiq's RedisBroker (same Redis),
the way Dramatiq's docs show it: actors, one ``actor.send()`` per child.

Workers: ``python -m dramatiq benchmarks.dramatiq_baseline --processes P --threads T``, or
``dramatiq-gevent ...`` (the launcher that runs them under gevent, for network-bound actors:
the Advanced Topics guide) with the same arguments, T greenlets per process.
The broker's default middleware (Dramatiq acks a message after its actor ran, as fanout's late
acks); ``max_retries=0`` (an option of the default Retries middleware) so a failure shows at
once instead of being retried for minutes (the driver refuses to report a number when anything
failed). The leaf is the worker's leaf kind (``benchmarks/leaf.py``, ``BENCH_LEAF``).

With ``BENCH_DRAMATIQ_ASYNC=1`` the leaf is an ``async def`` actor on the AsyncIO middleware
(the Cookbook's "Asyncio Actors"), running ``leaf.harvest_leaf_async`` on the process's event
loop thread. Each worker thread waits for its coroutine, so a process still has at most T
messages in flight (Dramatiq's docs say so): T is the in-flight bound here too.

Dramatiq has no bulk enqueue: ``group(...).run()`` calls ``broker.enqueue`` once per message
(``dramatiq/composition.py``), which is what ``send()`` does, so the children go one by one.
"""

from __future__ import annotations

import os

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AsyncIO

from benchmarks import baseline_common as common
from benchmarks import leaf

QUEUE = "bench_dramatiq"
ASYNC_ENV = "BENCH_DRAMATIQ_ASYNC"

# Its own pool so the connection cap can follow the worker's threads (RedisBroker(url=...)
# builds a pool with redis-py's default cap, 100: too few for 1,000 greenlets).
broker = RedisBroker(client=redis.Redis(connection_pool=redis.ConnectionPool.from_url(
    os.environ.get("FANOUT_REDIS_URL", "redis://127.0.0.1:6379/0"),
    max_connections=common.redis_max_connections())))
if os.environ.get(ASYNC_ENV):
    broker.add_middleware(AsyncIO())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def account(tag: str, vendor_url: str, account_id: str, end_day: str, days: int) -> None:
    for item in leaf.list_services(vendor_url, account_id):
        service.send(tag, vendor_url, item, end_day, days)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def service(tag: str, vendor_url: str, item: dict[str, str], end_day: str, days: int) -> None:
    for day in common.metric_days(end_day, days):
        metric_day.send(tag, vendor_url, {**item, "day": day})


if os.environ.get(ASYNC_ENV):

    @dramatiq.actor(queue_name=QUEUE, max_retries=0, actor_name="metric_day")
    async def metric_day(tag: str, vendor_url: str, item: dict[str, str]) -> None:
        await leaf.harvest_leaf_async(tag, vendor_url, item)

else:

    @dramatiq.actor(queue_name=QUEUE, max_retries=0)
    def metric_day(tag: str, vendor_url: str, item: dict[str, str]) -> None:
        leaf.harvest_leaf(tag, vendor_url, item)
