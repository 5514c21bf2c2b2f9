"""The Dramatiq baseline: the same three-stage shape on Dramatiq's RedisBroker (same Redis),
the way Dramatiq's docs show it: actors, one ``actor.send()`` per child.

Worker: ``python -m dramatiq benchmarks.dramatiq_baseline --processes P --threads T``.
The broker's default middleware (Dramatiq acks a message after its actor ran, as fanout's late
acks); ``max_retries=0`` (an option of the default Retries middleware) so a failure shows at
once instead of being retried for minutes (the driver refuses to report a number when anything
failed). The leaf is the worker's leaf kind (``benchmarks/leaf.py``, ``BENCH_LEAF``).
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from benchmarks import baseline_common as common
from benchmarks import leaf

QUEUE = "bench_dramatiq"

broker = RedisBroker(url=os.environ.get("FANOUT_REDIS_URL", "redis://127.0.0.1:6379/0"))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def account(tag: str, vendor_url: str, account_id: str, end_day: str, days: int) -> None:
    for item in leaf.list_services(vendor_url, account_id):
        service.send(tag, vendor_url, item, end_day, days)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def service(tag: str, vendor_url: str, item: dict[str, str], end_day: str, days: int) -> None:
    for day in common.metric_days(end_day, days):
        metric_day.send(tag, vendor_url, {**item, "day": day})


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def metric_day(tag: str, vendor_url: str, item: dict[str, str]) -> None:
    leaf.harvest_leaf(tag, vendor_url, item)
