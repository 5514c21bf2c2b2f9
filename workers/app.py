"""The Celery app: JSON only, late acks, an explicit visibility timeout, task events on.

``celery -A workers worker`` finds ``app`` here (re-exported by ``workers/__init__``).
"""

from __future__ import annotations

import importlib

from celery import Celery
from celery.signals import worker_ready
from kombu import Exchange, Queue

from workers.connections import resolve_broker_url
from workers.settings import get_settings

#: Pipelines every worker imports; more come from FANOUT_PIPELINES=module,module.
BUILTIN_PIPELINES = ("workers.pipelines.demo",)


def transport_options(visibility_timeout_s: int) -> dict[str, int]:
    """Redis transport options. kombu sweeps for expired unacked messages every
    interval x throttle seconds (100 s by default); sweep a few times per visibility
    timeout instead, so a killed worker's messages come back soon after it expires."""
    return {
        "visibility_timeout": visibility_timeout_s,
        "unacked_restore_interval": max(1, min(10, visibility_timeout_s // 3)),
        "unacked_restore_throttle": 1,
    }


def _broker_defaults() -> dict[str, str | None]:
    from workers.broker import TRANSPORT

    url = resolve_broker_url()
    redis_broker = url.startswith(("redis://", "rediss://"))
    return {"broker_url": url, "broker_transport": TRANSPORT if redis_broker else None}


def _configure(app: Celery) -> None:
    settings = get_settings()
    # Resolved when Celery first needs it, so importing `workers` never starts a server.
    app.add_defaults(_broker_defaults)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        # A message unacked this long is given to another worker; it must exceed the longest task.
        broker_transport_options=transport_options(settings.visibility_timeout_s),
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # Results go to the sink and the run ledger, never to a Celery result backend.
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        # At-least-once: ack after the task, and give the message back if the worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=settings.prefetch_multiplier,
        # Flower needs task events.
        worker_send_task_events=True,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        enable_utc=True,
    )


def load_pipelines(app: Celery) -> None:
    """Import every configured pipeline (registering its tasks), then declare their queues.

    Called by ``workers/__init__`` once this module exists, because pipelines import the
    runtime, which imports this app.
    """
    for module in (*BUILTIN_PIPELINES, *get_settings().pipelines):
        importlib.import_module(module)
    _declare_queues(app)


def _declare_queues(app: Celery) -> None:
    """One queue per stage, named after it, so a worker can be pointed at some stages only."""
    from workers.pipeline import all_pipelines

    # The default exchange ("") routes by queue name alone: no binding table to look up
    # on every publish, and nothing to lose if Redis is flushed under a running producer.
    direct = Exchange("")
    stages = [stage for p in all_pipelines() for stage in p.stages.values()]
    app.conf.task_queues = [Queue(s.queue, direct, routing_key=s.queue) for s in stages]
    app.conf.task_default_queue = "fanout.default"
    app.conf.task_routes = {
        s.task_name: {"queue": s.queue, "exchange": "", "routing_key": s.queue} for s in stages
    }


@worker_ready.connect
def _start_background_threads(**_: object) -> None:
    from workers import looping, reaper

    reaper.start(get_settings().visibility_timeout_s)
    looping.start_mover()


app = Celery("fanout")
_configure(app)
