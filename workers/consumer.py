"""Celery's consumer, with every message it cannot run set aside as a dead letter.

Stock Celery logs and drops a message it cannot decode, of an unknown task or of a content
type it does not accept. fanout keeps each one, with its raw body and the reason, in the
dead letters (``dead_letters.py``), then acknowledges it: the worker goes on, nothing is
lost silently. Works on every broker (``broker.py`` catches what kombu's Redis transport
cannot even turn into a message).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from workers.engine.services import services

log = logging.getLogger("fanout.consumer")


def _raw(message: Any) -> str:
    body = message.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    return json.dumps({
        "content_type": message.content_type, "headers": message.headers, "body": body,
    }, default=str)


class Consumer(CeleryConsumer):
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
