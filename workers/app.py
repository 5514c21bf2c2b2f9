"""The Celery app: JSON only, late acks, an explicit visibility timeout, task events on, one
thin task per stage of every loaded pipeline, and bad messages set aside, never fatal.

``create_app`` has no effect until called; ``workers/celery.py`` calls it for
``celery -A workers``. A task turns its call into a ``Delivery`` and hands it to the engine.

Through a broker outage the worker lives on: its consumer tries again every 2 s at most
(``BrokerConnection``), without a limit, Celery's lines about it are cut to the first of each
outage (``outage_filter``, installed on Celery's log handlers), and the reaper is given kombu's
restore of unacknowledged messages (``RedisBrokerHooks``) for after a restart and after a
worker's death. On a Redis broker each worker process beats (``workers/liveness.py``), so
what it holds is renewed while it lives and put back within seconds once it dies.

The sink is opened at ``worker_init`` (``check_sink_at_start``): one that can never work as
configured stops the worker with one line and exit code 2; one merely unreachable is an
outage, told once, that the sink gate rides out (``workers/sinks/gate.py``). At
``worker_shutting_down`` the writes waiting at the gate give up, so their messages go back.

Before it connects (``worker_init``: ``size_for_worker``) a worker sizes its pools from its
threads (``-c``) and its in-flight bound (``--max-in-flight``, an option this app adds to
``celery worker``), so none of them can run dry and strand a claimed batch.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import click
import redis
from celery import Celery, Task
from celery.app.amqp import AMQP
from celery.exceptions import Reject, Retry
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_init,
    worker_ready,
    worker_shutting_down,
)
from kombu import Connection, Exchange, Queue
from kombu.exceptions import OperationalError
from kombu.transport.redis import Mutex, MutexHeld

from workers import broker, keys
from workers.api import Stage, all_pipelines, load_pipelines
from workers.connections import (
    broker_redis,
    get_redis,
    resolve_broker_url,
    size_pools,
    warn_if_evicting,
)
from workers.engine.batch_record import process_gate
from workers.engine.reaper import start_reaper
from workers.engine.runner import INFRA_ERRORS, ItemReport, StageRunner
from workers.engine.scheduler import start_mover
from workers.engine.services import Services, services
from workers.event_loop import (
    DEFAULT_MAX_IN_FLIGHT,
    MAX_IN_FLIGHT,
    MAX_IN_FLIGHT_ENV,
    SPARE_FILES,
    check_max_in_flight,
    ensure_open_files,
    max_in_flight,
)
from workers.events import ItemEvents
from workers.liveness import Liveness, start_heartbeat
from workers.liveness import worker_id as liveness_worker_id
from workers.message import BadMessage, decode_redis, from_task_call
from workers.outage import DOWN_ERRORS, OncePerOutage
from workers.outcome import Outcome
from workers.settings import ConfigError, Settings, get_settings, validate_environment
from workers.sinks import SinkDown, open_sink
from workers.sinks import size_pool as size_sink_pool
from workers.stage_config import apply_config_file

#: How soon Celery's consumer tries the broker again after losing it. kombu's defaults wait
#: 2 s, then 2 s more at each try, up to 30 s: a worker came back up to 30 s after Redis did.
RECONNECT_INTERVALS = {"interval_start": 0.5, "interval_step": 0.5, "interval_max": 2.0}


class BrokerConnection(Connection):
    """kombu's connection, reconnecting within ``interval_max`` of the broker's return."""

    def ensure_connection(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) <= 2:  # (errback, max_retries): the intervals are not given
            for key, value in RECONNECT_INTERVALS.items():
                kwargs.setdefault(key, value)
        return super().ensure_connection(*args, **kwargs)


class BrokerAMQP(AMQP):
    """Celery's AMQP helpers, with ``BrokerConnection`` for every connection of the app."""

    Connection = BrokerConnection


def transport_options(visibility_timeout_s: int) -> dict[str, Any]:
    """Redis transport options. kombu sweeps for expired unacked messages every
    interval x throttle seconds (100 s by default); sweep a few times per visibility
    timeout instead, so a killed worker's messages come back soon after it expires. A stage
    queue's lanes are kombu's priority steps (``keys.LANES``): Celery consumes each, and
    Flower, which reads these options, counts each in the queue's length."""
    return {
        "visibility_timeout": visibility_timeout_s,
        "unacked_restore_interval": max(1, min(10, visibility_timeout_s // 3)),
        "unacked_restore_throttle": 1,
        "priority_steps": list(range(keys.LANES)),
    }


def _broker_defaults() -> dict[str, str | None]:
    return {"broker_url": resolve_broker_url()}


def configure(app: Celery, settings: Settings) -> None:
    # Resolved when Celery first needs it, so creating the app never starts a server.
    app.add_defaults(_broker_defaults)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        # Ride out a broker outage of any length (a try every 2 s, one log line: outage.py).
        broker_connection_max_retries=None,
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
        worker_send_task_events=settings.task_events,
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
    item_events = ItemEvents(app)  # one event dispatcher per worker process, for every stage
    for stage in stages:
        _make_task(app, stage, item_events)
    direct = Exchange("")
    app.conf.task_queues = [Queue(s.queue, direct, routing_key=s.queue) for s in stages]
    app.conf.task_default_queue = "fanout.default"
    app.conf.task_routes = {
        s.task_name: {"queue": s.queue, "exchange": "", "routing_key": s.queue} for s in stages
    }


class _PoolSize:
    """This worker's pool size (``-c``): the threads a claim shares a stage queue with (set at
    worker_init, before a prefork pool forks)."""

    threads = 1


#: ``celery -A workers worker --max-in-flight N`` (and ``fanout worker --max-in-flight N``).
MAX_IN_FLIGHT_OPTION = click.Option(
    ["--max-in-flight"], type=int, default=None,
    help=f"fanout: items of async stages in flight per process, 1 to {MAX_IN_FLIGHT:,} "
         f"(default {DEFAULT_MAX_IN_FLIGHT:,}, or {MAX_IN_FLIGHT_ENV})",
)


def size_for_worker(sender: Any = None, **_: object) -> None:
    """Size this worker's pools before it connects (worker_init): its threads (``-c``) set
    the Redis pools, ledger and broker, and the sink's (each thread writes its batches), and
    its in-flight bound (``--max-in-flight``) the HTTP connections per host (one event loop
    makes every async call) and the open files it may need. A bound or a thread count this
    machine cannot serve stops the worker with one line, exit 2."""
    concurrency = getattr(sender, "concurrency", None)
    if isinstance(concurrency, int) and concurrency > 0:
        _PoolSize.threads = concurrency
    option = (getattr(sender, "options", None) or {}).get("max_in_flight")
    try:
        if option is not None:  # the worker's processes read it from the environment
            os.environ[MAX_IN_FLIGHT_ENV] = str(check_max_in_flight(option, "--max-in-flight"))
        bound = max_in_flight()
        pool = size_pools(_PoolSize.threads)
        size_sink_pool(_PoolSize.threads)
        # A socket per call in flight and per thread's own transport, the Redis pools.
        ensure_open_files(bound + _PoolSize.threads + 3 * pool + SPARE_FILES)
    except ConfigError as exc:
        print(f"fanout worker: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if sender is not None and getattr(sender, "app", None) is not None:
        conf = sender.app.conf
        conf.broker_transport_options = {**conf.broker_transport_options,
                                         "max_connections": pool}


def check_sink_at_start(**_: object) -> None:
    """Open this process's sink before taking any message: a sink that can never work as
    configured (no driver, an unsupported URL, no such database, bad credentials) stops the
    worker in one line, exit 2; one unreachable now is an outage the sink gate waits out."""
    try:  # opened and closed: a prefork pool's children must not share its connections
        open_sink(get_settings().sink_url).close()
    except ConfigError as exc:
        print(f"fanout worker: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except SinkDown as exc:
        process_gate(services()).went_down(exc)


def _release_sink_gate(**_: object) -> None:
    process_gate(services()).stop()


def _make_task(app: Celery, stage: Stage, item_events: ItemEvents) -> Task:
    runner: list[StageRunner] = []  # made in the process that runs the task (after a fork)

    def run_stage(self: Task, *args: Any, **kwargs: Any) -> str:
        svc = services()
        if not runner or runner[0].services is not svc:
            _beat_in_this_process(svc)
            runner[:] = [StageRunner(svc, claim_share=_PoolSize.threads)]
        try:
            delivery = from_task_call(self.name, args, kwargs, self.request.retries)
        except BadMessage as exc:
            raw = json.dumps({"task": self.name, "args": args, "kwargs": kwargs}, default=str)
            svc.dead_letters.add(stage.queue, raw, exc.reason)
            return f"{Outcome.DEAD_LETTER.value}: {exc.reason}"
        try:
            reports = runner[0].run_claimed(delivery, stage)
        except INFRA_ERRORS as exc:
            raise Reject(str(exc), requeue=True) from exc
        if app.conf.worker_send_task_events:  # Flower sees each item the batch carried too
            item_events.emit(self.request.hostname, reports[1:])
        _tell_celery(reports[0])
        return _describe([r.outcome for r in reports])

    run_stage.__name__ = stage.name
    run_stage.__qualname__ = stage.task_name
    # throws: a stage's error is expected; Celery logs it in one line (the runner has logged
    # its traceback) and still sends task-failed with it.
    task: Task = app.task(name=stage.task_name, bind=True, throws=(Exception,))(run_stage)
    return task


def _tell_celery(own: ItemReport) -> None:
    """The task's own item failed, is retried or held back by a limit: everything is
    recorded already, so raise now for Celery to tell Flower the truth, FAILURE with the
    item's error and traceback, or RETRY (the next attempt is scheduled; Celery only
    acknowledges the message), with ``Throttled`` naming the limit for a held item."""
    if own.exception is None:
        return
    if own.outcome is Outcome.FAILED:
        raise own.exception
    if own.outcome in (Outcome.RETRYING, Outcome.THROTTLED):
        raise Retry(own.error, exc=own.exception) from own.exception


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


_RESTORE_TRIES = 50  # x 0.1 s


class RedisBrokerHooks:
    """The reaper's view of a Redis broker (``engine.reaper.BrokerHooks`` and
    ``WorkerHooks``): which server it is, kombu's own restore of unacknowledged messages
    (after a restart, by time; after a worker's death, by its held tags), and the workers'
    liveness (``workers/liveness.py``)."""

    def __init__(
        self, app: Celery, client: redis.Redis, liveness: Liveness | None = None
    ) -> None:
        self.app = app
        self.client = client
        self.liveness = liveness or Liveness(client, get_settings().ledger_ttl_s)
        self.me = liveness_worker_id()

    def server(self) -> tuple[str, float]:
        info = self.client.info("server")
        return str(info["run_id"]), float(info["uptime_in_seconds"])

    def restore_unacked(self, delivered_before: float) -> int:
        with self.app.connection_for_write() as connection:
            channel = connection.default_channel
            qos = channel.qos
            with channel.conn_or_acquire() as client:
                for _ in range(_RESTORE_TRIES):
                    try:  # the lock kombu's own restore takes: one restorer at a time
                        with Mutex(client, qos.unacked_mutex_key, qos.unacked_mutex_expire):
                            tags = client.zrangebyscore(qos.unacked_index_key, "-inf",
                                                        delivered_before)
                            for tag in tags:
                                qos.restore_by_tag(tag, client)  # restored or acked, once
                            return len(tags)
                    except MutexHeld:  # another worker restores them, or kombu sweeps
                        time.sleep(0.1)
        raise TimeoutError("kombu's unacked lock stayed held: restoring on the next probe")

    def unacked(self) -> int:
        with self.app.connection_for_write() as connection:
            channel = connection.default_channel
            with channel.conn_or_acquire() as client:
                return int(client.hlen(channel.qos.unacked_key))

    def dead(self) -> list[str]:
        return self.liveness.dead()

    def take(self, worker: str) -> bool:
        return bool(self.client.set(keys.worker_reaping(worker), self.me, nx=True,
                                    ex=keys.REAPING_TTL_S))

    def claim_queues(self, worker: str) -> list[str]:
        return self.liveness.claim_queues(worker)

    def restore_held(self, worker: str) -> int:
        tags = self.liveness.held(worker)
        live_held = [keys.worker_held(w) for w in self.liveness.alive() if w != worker]
        restored = 0
        with self.app.connection_for_write() as connection:
            channel = connection.default_channel
            qos = channel.qos
            with channel.conn_or_acquire() as client:
                for tag in tags:
                    restored += qos.restore_unless_held(tag, client, live_held)
        return restored

    def forget(self, worker: str) -> bool:
        return self.liveness.forget(worker)

    def unacked_items(self) -> set[tuple[str, str]]:
        with self.app.connection_for_write() as connection:
            channel = connection.default_channel
            with channel.conn_or_acquire() as client:
                entries = client.hvals(channel.qos.unacked_key)
        items = set()
        for entry in entries:
            try:  # kombu's [envelope, exchange, routing key]
                delivery = decode_redis(json.dumps(json.loads(entry)[0]))
            except (BadMessage, ValueError, TypeError, IndexError, KeyError):
                continue  # not a fanout message
            items.add((delivery.run_id, delivery.item_id))
        return items


def _unacked_index_key(app: Celery) -> str:
    """The name of kombu's sorted set of delivery times (a transport option)."""
    with app.connection_for_write() as connection:
        return str(connection.default_channel.unacked_index_key)


def _start_background_threads(app: Celery) -> None:
    svc = services()
    client = broker_redis(resolve_broker_url(svc.settings))
    ledger_redis = get_redis()
    warn_if_evicting(ledger_redis, "the run ledger")
    hooks = None
    if client is not None:  # RabbitMQ redelivers a lost connection's messages by itself
        if client is not ledger_redis:  # one client per URL
            warn_if_evicting(client, "the broker")
        liveness = Liveness(client, svc.settings.ledger_ttl_s, _unacked_index_key(app))
        # Known alive before it takes a message.
        start_heartbeat(liveness, broker.held_tags, svc.transport.settle)
        hooks = RedisBrokerHooks(app, client, liveness)
    start_reaper(svc, svc.settings.visibility_timeout_s, broker=hooks, workers=hooks)
    start_mover(svc.scheduler)


def _beat_in_this_process(svc: Services) -> None:
    """A prefork pool's child claims batches under its own id: it beats too, holding no
    kombu message (its parent consumes). With the threads pool the worker's one process
    beats already, since before its consumer took a message: this is then a no-op."""
    client = broker_redis(resolve_broker_url(svc.settings))
    if client is not None:
        start_heartbeat(Liveness(client, svc.settings.ledger_ttl_s), tuple,
                        svc.transport.settle)


#: Celery's lines of a lost broker connection: one per reconnect attempt, and per task it could
#: not acknowledge or cancel. The first of an outage is kept, until "Connected to" is logged.
CELERY_OUTAGE_PHRASES = (
    "Connection to broker lost", "Cannot connect to", "after a connection loss",
    "after connection loss",
)
CELERY_BACK_PHRASES = ("Connected to",)


def outage_filter() -> OncePerOutage:
    """The filter that keeps one line per outage of Celery's (and of a task's Redis error)."""
    return OncePerOutage((*DOWN_ERRORS, OperationalError, SinkDown), CELERY_OUTAGE_PHRASES,
                         CELERY_BACK_PHRASES)


def _install_outage_filter(log_filter: OncePerOutage, logger: logging.Logger) -> None:
    for handler in logger.handlers:
        if log_filter not in handler.filters:
            handler.addFilter(log_filter)


def create_app(settings: Settings | None = None) -> Celery:
    """The worker's Celery app, with every configured pipeline loaded, the config file's
    stage settings over their own (``workers/stage_config.py``), and registered. Without
    ``settings``, the environment's, checked (a bad one, or a bad config file: ConfigError,
    before Celery starts)."""
    settings = settings or validate_environment()
    broker.install()  # fanout's Redis transport for redis:// broker URLs
    app = Celery("fanout", amqp=BrokerAMQP)
    configure(app, settings)
    load_pipelines(settings.pipeline_modules)
    apply_config_file()
    register_stages(app, [s for p in all_pipelines() for s in p.stages.values()])

    def start_threads(**_: object) -> None:
        _start_background_threads(app)

    log_filter = outage_filter()

    def install_filter(logger: logging.Logger, **_: object) -> None:
        _install_outage_filter(log_filter, logger)

    app.user_options["worker"].add(MAX_IN_FLIGHT_OPTION)
    worker_init.connect(size_for_worker, weak=False, dispatch_uid="fanout-pool-size")
    worker_init.connect(check_sink_at_start, weak=False, dispatch_uid="fanout-sink-check")
    worker_shutting_down.connect(_release_sink_gate, weak=False,
                                 dispatch_uid="fanout-sink-gate")
    worker_ready.connect(start_threads, weak=False, dispatch_uid="fanout-threads")
    # Once Celery has set up its handlers (the root logger's and the task logger's).
    after_setup_logger.connect(install_filter, weak=False, dispatch_uid="fanout-outage-log")
    after_setup_task_logger.connect(install_filter, weak=False,
                                    dispatch_uid="fanout-outage-task-log")
    return app
