"""The hand-written Celery fan-out baseline: what a user writes without fanout, the way Celery's
docs show it (a task per unit of work), with the settings Celery's docs recommend for the job.

Its own app on the same Redis, its own queue, JSON, late acks (the same reliability fanout asks
for) and ignored results (no result backend: nobody reads them). Three tasks of the demo shape:
``account`` lists services (every page) and sends one ``service`` each; ``service`` sends one
``metric_day`` per day; ``metric_day`` runs the worker's leaf kind (``benchmarks/leaf.py``,
``BENCH_LEAF``: fanout's own leaf code by default) and INCRs the run's completion counter, which
the driver watches.

How a task sends its children is ``BENCH_CELERY_PUBLISH`` (the harvest suite's sweep picks it):

- ``each``: one ``task.delay()`` per child, as the First Steps guide shows;
- ``group``: ``group(task.s(...) for ...).apply_async()``, which publishes every child over one
  producer (one broker connection) taken once (Canvas guide);
- ``chunks:N``: the leaves as ``metric_day.chunks(args, N)`` (Canvas guide: one message runs N
  leaves one after another, "avoiding the overhead of messaging"), published as a group; the
  services still go out as a group.

The worker's prefetch multiplier (``--prefetch-multiplier``; the Optimizing guide: large, "Say
64, or 128", for many short tasks), pool, concurrency and task events (``-E``) are the worker
command's (``benchmarks/contenders.py``). ``broker_pool_limit`` is the worker's concurrency
(``BENCH_CELERY_POOL_LIMIT``): the Optimizing guide sizes it by the threads or green threads
that publish; the Redis transport's ``max_connections`` is ``BENCH_REDIS_MAX_CONNECTIONS``.

Worker: ``python -m celery -A benchmarks.celery_baseline worker -Q bench.celery ...``.
``add`` is the small stock task the memory suite measures a message of.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from celery import Celery, group

from benchmarks import baseline_common as common
from benchmarks import leaf

QUEUE = "bench.celery"
PUBLISH_ENV = "BENCH_CELERY_PUBLISH"
POOL_LIMIT_ENV = "BENCH_CELERY_POOL_LIMIT"
PUBLISH_MODES = ("each", "group", "chunks")

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
if os.environ.get(POOL_LIMIT_ENV):
    app.conf.broker_pool_limit = int(os.environ[POOL_LIMIT_ENV])
if common.redis_max_connections():
    # kombu's Redis transport caps each channel's pool at 10 connections (its
    # ``max_connections`` transport option): 1,000 greenlets acking at once need more.
    app.conf.broker_transport_options = {"max_connections": common.redis_max_connections()}


def publish_mode() -> tuple[str, int]:
    """(mode, chunk size) from ``BENCH_CELERY_PUBLISH``: ``each``, ``group`` or ``chunks:N``."""
    value = os.environ.get(PUBLISH_ENV) or "each"
    mode, _, size = value.partition(":")
    if mode not in PUBLISH_MODES or (mode == "chunks") != size.isdigit():
        raise ValueError(f"{PUBLISH_ENV}={value!r}: expected each, group or chunks:N")
    return mode, int(size or 0)


def send_children(task: Any, calls: Sequence[tuple[Any, ...]], *, leaves: bool) -> None:
    """Send one ``task`` per argument tuple in ``calls``, the way ``BENCH_CELERY_PUBLISH``
    says (chunks apply to leaves only)."""
    mode, size = publish_mode()
    if mode == "each":
        for args in calls:
            task.delay(*args)
    elif mode == "chunks" and leaves:
        task.chunks(calls, size).apply_async()
    else:
        group(task.s(*args) for args in calls).apply_async()


@app.task(name="baseline.account")
def account(tag: str, vendor_url: str, account_id: str, end_day: str, days: int) -> int:
    services = leaf.list_services(vendor_url, account_id)
    send_children(service, [(tag, vendor_url, item, end_day, days) for item in services],
                  leaves=False)
    return len(services)


@app.task(name="baseline.service")
def service(tag: str, vendor_url: str, item: dict[str, str], end_day: str, days: int) -> int:
    day_list = common.metric_days(end_day, days)
    send_children(metric_day, [(tag, vendor_url, {**item, "day": day}) for day in day_list],
                  leaves=True)
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
