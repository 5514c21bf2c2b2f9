"""The hand-written Celery fan-out baseline: what a user writes without fanout, the way Celery's
docs show it (a task per unit of work, ``task.delay()`` per child).

Its own app on the same Redis, its own queue, stock Celery settings except JSON, late acks (the
same reliability fanout asks for) and ignored results (no result backend: nobody reads them).
The prefetch multiplier is Celery's default, 4, as fanout's. Three tasks of the demo shape, one
``.delay()`` per child: ``account`` lists services (every page) and delays one ``service``
each; ``service`` delays one ``metric_day`` per day; ``metric_day`` runs the worker's leaf kind
(``benchmarks/leaf.py``, ``BENCH_LEAF``: fanout's own leaf code by default) and INCRs the run's
completion counter, which the driver watches.

Worker: ``python -m celery -A benchmarks.celery_baseline worker -E -Q bench.celery ...``.
``add`` is the small stock task the memory suite measures a message of.
"""

from __future__ import annotations

import os

from celery import Celery

from benchmarks import baseline_common as common
from benchmarks import leaf

QUEUE = "bench.celery"

app = Celery("baseline", broker=os.environ.get("FANOUT_REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_ignore_result=True,
    task_acks_late=True,
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="baseline.account")
def account(tag: str, vendor_url: str, account_id: str, end_day: str, days: int) -> int:
    services = leaf.list_services(vendor_url, account_id)
    for item in services:
        service.delay(tag, vendor_url, item, end_day, days)
    return len(services)


@app.task(name="baseline.service")
def service(tag: str, vendor_url: str, item: dict[str, str], end_day: str, days: int) -> int:
    day_list = common.metric_days(end_day, days)
    for day in day_list:
        metric_day.delay(tag, vendor_url, {**item, "day": day})
    return len(day_list)


@app.task(name="baseline.metric_day")
def metric_day(tag: str, vendor_url: str, item: dict[str, str]) -> None:
    leaf.harvest_leaf(tag, vendor_url, item)


@app.task(name="baseline.add")
def add(x: int, y: int) -> int:
    return x + y


def declare_queue() -> None:
    """Declare the queue and its binding (a worker does this on start; after a FLUSHALL with
    no worker running, a publisher must, or the message cannot be routed)."""
    from kombu import Exchange, Queue

    with app.connection_for_write() as conn:
        Queue(QUEUE, Exchange(QUEUE), QUEUE)(conn.default_channel).declare()
