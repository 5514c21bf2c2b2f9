"""The Celery app: JSON only, late acks, an explicit visibility timeout, task events on, one
thin task per stage of every loaded pipeline, and bad messages set aside, never fatal.

``create_app`` has no effect until called; ``workers/celery.py`` calls it for
``celery -A workers``. A task turns its call into a ``Delivery`` and hands it to the engine.
"""

from __future__ import annotations

import json
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from celery.signals import worker_ready
from kombu import Exchange, Queue

from workers.api import Stage, all_pipelines, load_pipelines
from workers.broker import TRANSPORT
from workers.connections import resolve_broker_url
from workers.engine.reaper import start_reaper
from workers.engine.runner import INFRA_ERRORS, StageRunner
from workers.engine.scheduler import start_mover
from workers.engine.services import services
from workers.message import BadMessage, from_task_call
from workers.outcome import Outcome
from workers.settings import Settings, get_settings


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
    url = resolve_broker_url()
    redis_broker = url.startswith(("redis://", "rediss://"))
    return {"broker_url": url, "broker_transport": TRANSPORT if redis_broker else None}


def configure(app: Celery, settings: Settings) -> None:
    # Resolved when Celery first needs it, so creating the app never starts a server.
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
        # Undecodable and unknown messages go to the dead letters instead of being dropped.
        worker_consumer="workers.consumer:Consumer",
        enable_utc=True,
    )


def register_stages(app: Celery, stages: list[Stage]) -> None:
    """One task and one queue per stage, named after it, so a worker can be pointed at some
    stages only. The default exchange ("") routes by queue name alone."""
    for stage in stages:
        _make_task(app, stage)
    direct = Exchange("")
    app.conf.task_queues = [Queue(s.queue, direct, routing_key=s.queue) for s in stages]
    app.conf.task_default_queue = "fanout.default"
    app.conf.task_routes = {
        s.task_name: {"queue": s.queue, "exchange": "", "routing_key": s.queue} for s in stages
    }


def _make_task(app: Celery, stage: Stage) -> Task:
    runner: list[StageRunner] = []  # made in the process that runs the task (after a fork)

    def run_stage(self: Task, *args: Any, **kwargs: Any) -> str:
        svc = services()
        if not runner or runner[0].services is not svc:
            runner[:] = [StageRunner(svc)]
        try:
            delivery = from_task_call(self.name, args, kwargs, self.request.retries)
        except BadMessage as exc:
            raw = json.dumps({"task": self.name, "args": args, "kwargs": kwargs}, default=str)
            svc.dead_letters.add(stage.queue, raw, exc.reason)
            return f"{Outcome.DEAD_LETTER.value}: {exc.reason}"
        try:
            outcomes = runner[0].run_claimed(delivery, stage)
        except INFRA_ERRORS as exc:
            raise Reject(str(exc), requeue=True) from exc
        if outcomes[0] is Outcome.RETRYING:
            self.send_event("task-retried", exception="retry scheduled by fanout", traceback="")
        return _describe(outcomes)

    run_stage.__name__ = stage.name
    run_stage.__qualname__ = stage.task_name
    task: Task = app.task(name=stage.task_name, bind=True)(run_stage)
    return task


def _describe(outcomes: list[Outcome]) -> str:
    """What Flower shows as the task's result: this item, then the batch it carried."""
    first, rest = outcomes[0].value, outcomes[1:]
    if not rest:
        return first
    counts: dict[str, int] = {}
    for outcome in rest:
        counts[outcome.value] = counts.get(outcome.value, 0) + 1
    return f"{first}; batch of {len(rest)} more: " + ", ".join(
        f"{n} {what}" for what, n in sorted(counts.items())
    )


def _start_background_threads(**_: object) -> None:
    svc = services()
    start_reaper(svc, svc.settings.visibility_timeout_s)
    start_mover(svc.scheduler)


def create_app(settings: Settings | None = None) -> Celery:
    """The worker's Celery app, with every configured pipeline loaded and registered."""
    settings = settings or get_settings()
    app = Celery("fanout")
    configure(app, settings)
    load_pipelines(settings.pipeline_modules)
    register_stages(app, [s for p in all_pipelines() for s in p.stages.values()])
    worker_ready.connect(_start_background_threads, weak=False, dispatch_uid="fanout-threads")
    return app
