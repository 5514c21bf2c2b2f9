"""``Delivery``: the one message type, its Celery protocol-2 codec, and its task id.

A delivery asks a worker to run one item of one stage (one iteration of a looping item, one
attempt). On the wire it is a Celery task message: task ``PIPELINE.STAGE``, args
``[run_id, item_id, payload]``, kwargs ``{"loop": {"iteration", "payload"}}`` after the first
iteration, header ``retries`` = attempt - 1, task id ``RUN.ITEM`` (``RUN.ITEM.K`` for iteration
K). ``encode_redis`` builds what kombu's Redis transport stores for it (tests check it equals
what kombu's own producer stores); ``decode_redis`` and ``from_task_call`` check every field
and raise ``BadMessage`` with the reason instead of letting a bad message reach a stage.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import uuid
from dataclasses import dataclass, replace
from typing import Any

from workers.ids import RawJSON, to_json
from workers.keys import queue_name

CONTENT_TYPE = "application/json"
_QUEUE_PREFIX = queue_name("", "")[:-1]  # "fanout.": a queue is this + PIPELINE.STAGE
_TASK_NAME = re.compile(r"^[a-z0-9_]+\.[a-z0-9_]+$")
_ARGSREPR_CHARS = 200
_EMBED = '{"callbacks": null, "errbacks": null, "chain": null, "chord": null}'
# The envelope kombu's Redis transport stores, constant parts written once (each %s is a JSON
# value): json.dumps of a whole dict per message cost more than everything else on the
# fan-out hot path. Headers Celery's worker only reads with a default (root_id, timelimit,
# origin, lang, ...) are left out, and the body is plain JSON, not base64.
_ENVELOPE = (
    '{"body": %s, "content-encoding": "utf-8", "content-type": "application/json", '
    '"headers": {"task": %s, "id": %s, "retries": %d, "argsrepr": %s%s}, '
    '"properties": {"delivery_mode": 2, '
    '"delivery_info": {"exchange": "", "routing_key": %s}, "priority": 0, '
    '"delivery_tag": %s}}'
)
# Unique per message (kombu keys its unacked bookkeeping by it): a per-process prefix and a
# counter, cheaper than a uuid4 each.
_TAGS = itertools.count()
_TAG_PREFIX = uuid.uuid4().hex[:12]


class BadMessage(Exception):
    """A message that is not a fanout delivery; ``reason`` says why, in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Delivery:
    task: str  # PIPELINE.STAGE
    run_id: str
    item_id: str
    payload: Any  # the item: a JSON value (RawJSON text when freshly fanned out)
    iteration: int = 1
    loop_payload: Any = None
    attempt: int = 1

    @property
    def pipeline(self) -> str:
        return self.task.split(".", 1)[0]

    @property
    def stage(self) -> str:
        return self.task.split(".", 1)[1]

    @property
    def queue(self) -> str:
        return _QUEUE_PREFIX + self.task  # = keys.queue_name(pipeline, stage), but cheaper

    @property
    def task_id(self) -> str:
        return task_id(self.run_id, self.item_id, self.iteration)

    def next_attempt(self) -> Delivery:
        return replace(self, attempt=self.attempt + 1)

    def next_iteration(self, loop_payload: Any) -> Delivery:
        return replace(self, iteration=self.iteration + 1, loop_payload=loop_payload, attempt=1)

    # -- the Celery task call: args, kwargs, headers ------------------------------------

    def loop_kwarg(self) -> dict[str, Any] | None:
        if self.iteration == 1:
            return None
        return {"iteration": self.iteration, "payload": self.loop_payload}

    def body(self) -> str:
        """The protocol-2 body: ``[args, kwargs, embed]`` as JSON text."""
        loop = self.loop_kwarg()
        kwargs = json.dumps({"loop": loop}) if loop else "{}"
        return f"[[{self._args()}], {kwargs}, {_EMBED}]"

    def headers(self) -> dict[str, Any]:
        headers: dict[str, Any] = {
            "task": self.task, "id": self.task_id, "retries": self.attempt - 1,
            "argsrepr": f"({self._args()})"[:_ARGSREPR_CHARS],
        }
        loop = self.loop_kwarg()
        if loop:
            headers["kwargsrepr"] = json.dumps({"loop": loop})[:_ARGSREPR_CHARS]
        return headers

    def _args(self) -> str:
        return f"{json.dumps(self.run_id)}, {json.dumps(self.item_id)}, {to_json(self.payload)}"

    # -- a plain JSON form, for the delayed set ------------------------------------------

    def to_json(self) -> str:
        return json.dumps({
            "task": self.task, "run_id": self.run_id, "item_id": self.item_id,
            "payload": json.loads(self.payload) if isinstance(self.payload, RawJSON)
            else self.payload,
            "iteration": self.iteration, "loop_payload": self.loop_payload,
            "attempt": self.attempt,
        }, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Delivery:
        try:
            data = json.loads(text)
            return _checked(cls(
                task=data["task"], run_id=data["run_id"], item_id=data["item_id"],
                payload=data["payload"], iteration=data["iteration"],
                loop_payload=data["loop_payload"], attempt=data["attempt"],
            ))
        except (ValueError, KeyError, TypeError) as exc:
            raise BadMessage(f"not a delivery: {exc!r}") from None


def task_id(run_id: str, item_id: str, iteration: int) -> str:
    """``RUN.ITEM`` for the first iteration, ``RUN.ITEM.K`` after it."""
    return f"{run_id}.{item_id}" if iteration == 1 else f"{run_id}.{item_id}.{iteration}"


def encode_redis(delivery: Delivery) -> str:
    """The message as kombu's Redis transport stores it on the queue list (the same as
    ``body()`` and ``headers()`` give, written in one pass: this is the fan-out hot path)."""
    args = delivery._args()
    loop = delivery.loop_kwarg()
    if loop:
        kwargs = json.dumps({"loop": loop})
        kwargsrepr = f', "kwargsrepr": {json.dumps(kwargs[:_ARGSREPR_CHARS])}'
    else:
        kwargs, kwargsrepr = "{}", ""
    body = f"[[{args}], {kwargs}, {_EMBED}]"
    return _ENVELOPE % (
        json.dumps(body), json.dumps(delivery.task), json.dumps(delivery.task_id),
        delivery.attempt - 1, json.dumps(f"({args})"[:_ARGSREPR_CHARS]), kwargsrepr,
        json.dumps(delivery.queue), f'"{_TAG_PREFIX}{next(_TAGS)}"',
    )


def envelope_problem(envelope: Any) -> str | None:
    """Why kombu's Redis transport could not turn ``envelope`` into a message, or None."""
    if not isinstance(envelope, dict):
        return f"the envelope is a JSON {type(envelope).__name__}, not an object"
    properties = envelope.get("properties")
    if not isinstance(properties, dict):
        return "the envelope has no properties object"
    if "delivery_tag" not in properties:
        return "the envelope has no delivery_tag"
    if not isinstance(envelope.get("body"), str | type(None)):
        return "the envelope's body is not text"
    if not isinstance(envelope.get("headers"), dict | type(None)):
        return "the envelope's headers are not an object"
    return None


def decode_redis(raw: str | bytes) -> Delivery:
    """A message as kombu's Redis transport stores it -> a Delivery, or BadMessage."""
    try:
        envelope = json.loads(raw)
    except ValueError:
        raise BadMessage("not JSON") from None
    problem = envelope_problem(envelope)
    if problem:
        raise BadMessage(problem)
    content_type = envelope.get("content-type")
    if content_type != CONTENT_TYPE:
        raise BadMessage(f"content type {content_type!r} is not {CONTENT_TYPE}")
    headers = envelope.get("headers") or {}
    body = envelope.get("body") or ""
    if envelope["properties"].get("body_encoding") == "base64":
        try:
            body = base64.b64decode(body).decode()
        except ValueError:
            raise BadMessage("the body is not valid base64") from None
    try:
        args, kwargs, _embed = json.loads(body)
    except (ValueError, TypeError):
        raise BadMessage("the body is not a protocol-2 [args, kwargs, embed] list") from None
    return from_task_call(headers.get("task"), args, kwargs, headers.get("retries"))


def from_task_call(task: Any, args: Any, kwargs: Any, retries: Any) -> Delivery:
    """A Celery task call (name, args, kwargs, ``retries`` header) -> a Delivery."""
    if not isinstance(args, list | tuple) or len(args) != 3:
        raise BadMessage("args are not [run_id, item_id, item]")
    if not isinstance(kwargs, dict) or set(kwargs) - {"loop"}:
        raise BadMessage("kwargs are not {} or {'loop': ...}")
    run_id, item_id, payload = args
    loop = kwargs.get("loop")
    if loop is None:
        loop = {}
    elif not isinstance(loop, dict):
        raise BadMessage("the loop kwarg is not an object")
    if retries is not None and (not isinstance(retries, int) or retries < 0):
        raise BadMessage(f"the retries header {retries!r} is not a whole number")
    return _checked(Delivery(
        task=task, run_id=run_id, item_id=item_id, payload=payload,
        iteration=loop.get("iteration", 1), loop_payload=loop.get("payload"),
        attempt=(retries or 0) + 1,
    ))


def _checked(delivery: Delivery) -> Delivery:
    if not isinstance(delivery.task, str) or not _TASK_NAME.match(delivery.task):
        raise BadMessage(f"task {delivery.task!r} is not a fanout stage (PIPELINE.STAGE)")
    if not isinstance(delivery.run_id, str) or not delivery.run_id:
        raise BadMessage("the run id is not text")
    if not isinstance(delivery.item_id, str) or ":" not in delivery.item_id:
        raise BadMessage(f"item id {delivery.item_id!r} is not STAGE:ID")
    if not isinstance(delivery.iteration, int) or delivery.iteration < 1:
        raise BadMessage(f"loop iteration {delivery.iteration!r} is not a whole number >= 1")
    if not isinstance(delivery.attempt, int) or delivery.attempt < 1:
        raise BadMessage(f"attempt {delivery.attempt!r} is not a whole number >= 1")
    return delivery
