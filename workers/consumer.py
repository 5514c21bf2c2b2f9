"""Celery's consumer, with every message it cannot run set aside as a dead letter.

Stock Celery logs and drops a message it cannot decode, of an unknown task or of a content
type it does not accept, and a body of another shape (``[]``, ``{"a": 1}``) raised out of its
strategy and killed the worker: the message went back and killed the next one. Here each
message is decoded once, before Celery's strategy sees it, into a ``Delivery``
(``message.from_celery``): one that is not a fanout delivery is kept, with its raw body and
the reason, in the dead letters (``dead_letters.py``), then acknowledged, and the worker
goes on. Whatever Celery's strategy still raises on a message (other than a lost
connection) is set aside the same way. Works on every broker (``broker.py`` catches what
kombu's Redis transport cannot even turn into a message).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import ContentDisallowed
from vine import promise

from workers.api import find_stage
from workers.engine.services import services
from workers.message import BadMessage, from_celery

log = logging.getLogger("fanout.consumer")


def _raw(message: Any) -> str:
    body = message.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    return json.dumps({
        "content_type": message.content_type, "headers": message.headers, "body": body,
    }, default=str)


def message_problem(message: Any) -> str | None:
    """Why a message kombu made cannot run as a fanout stage, or None. Decodes its body the
    way Celery's strategy does (``message.decode()``, cached on the message, so Celery does
    not parse it again)."""
    try:
        payload = message.decode()
    except ContentDisallowed as exc:
        return f"content type not accepted: {exc}"
    except Exception as exc:  # kombu's DecodeError, or its JSON hook's own errors
        return f"cannot decode ({message.content_type}): {exc}"
    try:
        delivery = from_celery(message.headers, payload)
    except BadMessage as exc:
        return exc.reason
    if find_stage(delivery.task) is None:
        return f"unknown task {delivery.task!r}"
    return None


class Consumer(CeleryConsumer):
    def create_task_handler(self, promise: Any = promise) -> Callable[[Any], None]:
        celery_handler = super().create_task_handler(promise)
        lost_connection = (*self.connection_errors, *self.channel_errors)

        def on_task_received(message: Any) -> None:
            problem = message_problem(message)
            if problem is not None:
                self._dead_letter(message, problem)
                return
            try:
                celery_handler(message)
            except lost_connection:
                raise  # Celery's consumer reconnects; the message comes back
            except Exception as exc:
                self._dead_letter(message, f"Celery could not take it: {exc!r}"[:500])

        return on_task_received

    def _dead_letter(self, message: Any, reason: str) -> None:
        queue = (message.delivery_info or {}).get("routing_key") or "unknown"
        try:
            services().dead_letters.add(queue, _raw(message), reason)
        except Exception:  # never let bookkeeping kill the consumer
            log.exception("could not keep a dead letter (%s)", reason)
        message.ack()

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._dead_letter(message, f"cannot decode ({message.content_type}): {exc}")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._dead_letter(message, "not a task message (no task header)")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task")
        self._dead_letter(message, f"unknown task {name!r}")

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._dead_letter(message, f"invalid task message: {exc}")
