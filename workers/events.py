"""Task events for the items a task ran from its claimed batch, so Flower shows every item.

Celery sends task-received, -started and -succeeded for the message a task was given; the
items it claimed besides (``claim_batch``) are each their own task id (``RUN.ITEM``), and get
one event here as they ended: task-succeeded, -failed or -retried (a retry, or an item a
global limit holds back: its exception ``Throttled`` names the limit), named ``PIPELINE.STAGE``
with their arguments (the run id first) and received time. No separate task-received or
task-started: each event is CPU on the leaf's hot path, and Flower needs only the one.
They are buffered and sent as one ``task.multi`` message per batch (Celery's own event
batching, which Flower reads), on one dispatcher per worker process.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from celery import Celery

from workers.engine.runner import ItemReport
from workers.outcome import Outcome

_BUFFER_LIMIT = 10_000  # flushed once per batch, never by size


class ItemEvents:
    def __init__(self, app: Celery) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._dispatcher: Any = None
        self._pid = 0

    def emit(self, hostname: str, reports: Sequence[ItemReport]) -> None:
        """The events of ``reports`` (items that ran besides the task's own message)."""
        if not reports:
            return
        with self._lock:
            dispatcher = self._for(hostname)
            now = time.time()
            for report in reports:
                self._send_item(dispatcher, report, now)
            dispatcher.flush()

    def _for(self, hostname: str) -> Any:
        if self._dispatcher is None or self._pid != os.getpid():
            self._dispatcher = self.app.events.Dispatcher(
                self.app.connection_for_write(), hostname=hostname, enabled=True,
                buffer_group=["task"], buffer_limit=_BUFFER_LIMIT,
            )
            self._pid = os.getpid()
        return self._dispatcher

    @staticmethod
    def _send_item(dispatcher: Any, report: ItemReport, now: float) -> None:
        """One event per item: its end, carrying what task-received would have said (name,
        arguments, received time). Celery's event state merges an event's fields into the
        task, so Flower shows the same task as from two events, for half the CPU."""
        delivery, outcome = report.delivery, report.outcome
        headers = delivery.headers()
        uuid = delivery.task_id
        started = now - report.runtime_s
        about = {"uuid": uuid, "name": delivery.task, "args": headers["argsrepr"],
                 "kwargs": headers.get("kwargsrepr", "{}"), "retries": delivery.attempt - 1,
                 "root_id": uuid, "parent_id": None, "received": started, "started": started,
                 "timestamp": now}
        if outcome is Outcome.FAILED:
            dispatcher.send("task-failed", exception=report.error, traceback=report.traceback,
                            **about)
        elif outcome in (Outcome.RETRYING, Outcome.THROTTLED):  # it runs again later
            dispatcher.send("task-retried", exception=report.error,
                            traceback=report.traceback, **about)
        else:
            dispatcher.send("task-succeeded", result=outcome.value, runtime=report.runtime_s,
                            **about)
