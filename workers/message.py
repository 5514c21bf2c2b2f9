"""``Delivery``: the one message type, its Celery protocol-2 codec, and its task id.

A delivery asks a worker to run one item of one stage (one iteration of a looping item, one
attempt). On the wire it is a Celery task message: task ``PIPELINE.STAGE``, args
``[run_id, item_id, payload]``, kwargs ``{"loop": {"iteration", "payload"}}`` after the first
iteration, header ``retries`` = attempt - 1, task id ``RUN.ITEM`` (``RUN.ITEM.K`` for iteration
K). ``encode_redis`` builds what kombu's Redis transport stores for it (tests check it equals
what kombu's own producer stores).

Decoding checks every layer a queue item goes through and raises ``BadMessage`` with the
reason (the caller keeps it as a dead letter) instead of letting a bad message kill a worker
or reach a stage; each check is the one the worker itself runs at that layer:
- ``parse_envelope`` + ``envelope_problem``: what kombu's Redis transport needs to make a
  message of the item and keep it unacknowledged (``broker.py``, between BRPOP and kombu);
- ``from_celery``: a message's headers and decoded body, checked as far as Celery's strategy
  reads them, down to ``from_task_call`` (the consumer, before Celery's strategy; the task);
- ``decode_redis``: all of it on a raw item (claimed batches, tests). It raises nothing but
  ``BadMessage``, whatever the item holds (fuzzed in tests/test_message_fuzz.py).
"""

from __future__ import annotations

import itertools
import json
import re
import uuid
from dataclasses import dataclass, replace
from typing import Any

from kombu.compression import decompress as kombu_decompress
from kombu.serialization import loads as kombu_loads
from kombu.transport.virtual.base import Base64
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads as json_loads

from workers.ids import RawJSON, to_json
from workers.keys import queue_name

CONTENT_TYPE = "application/json"
_QUEUE_PREFIX = queue_name("", "")[:-1]  # "fanout.": a queue is this + PIPELINE.STAGE
_BASE64 = Base64()  # the codec kombu's virtual channels decode a base64 body with
_TASK_NAME = re.compile(r"^[a-z0-9_]+\.[a-z0-9_]+$")
_ARGSREPR_CHARS = 200
_REASON_CHARS = 120  # a value shown in a dead letter's reason is cut to this
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
    """Why kombu's Redis transport could not turn ``envelope`` into a message and keep it
    unacknowledged (``virtual.Message`` reads the properties and decodes the body, the QoS
    stores it by delivery tag under its exchange and routing key), or None."""
    if not isinstance(envelope, dict):
        return f"the envelope is a JSON {type(envelope).__name__}, not an object"
    properties = envelope.get("properties")
    if not isinstance(properties, dict):
        return "the envelope has no properties object"
    if "delivery_tag" not in properties:
        return "the envelope has no delivery_tag"
    if not isinstance(properties["delivery_tag"], str) or not properties["delivery_tag"]:
        return "the envelope's delivery_tag is not text"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not all(
        isinstance(info.get(key), str) for key in ("exchange", "routing_key")
    ):
        return "the envelope has no delivery_info with exchange and routing_key"
    if not isinstance(envelope.get("headers"), dict | type(None)):
        return "the envelope's headers are not an object"
    for field in ("content-type", "content-encoding"):
        if not isinstance(envelope.get(field), str | type(None)):
            return f"the envelope's {field} is not text"
    try:
        channel_body(envelope)
    except BadMessage as exc:
        return exc.reason
    return None


def content_type_problem(envelope: dict[str, Any]) -> str | None:
    """Why a fanout queue cannot take this envelope's content type (JSON only), or None."""
    content_type = envelope.get("content-type")
    if content_type == CONTENT_TYPE:
        return None
    return f"content type {_shown(content_type)} is not {CONTENT_TYPE}"


def channel_body(envelope: dict[str, Any]) -> str | bytes:
    """The envelope's body as kombu's virtual channel hands it to its ``Message``: base64
    decoded to bytes, else the text itself."""
    body = envelope.get("body")
    if not isinstance(body, str | type(None)):
        raise BadMessage("the envelope's body is not text")
    encoding = envelope["properties"].get("body_encoding")
    if encoding is None or (isinstance(encoding, str) and encoding.lower() == "utf-8"):
        return body or ""
    if encoding != "base64":
        raise BadMessage(f"body encoding {_shown(encoding)} is not base64 or utf-8")
    try:
        return bytes(_BASE64.decode(body or ""))
    except ValueError:
        raise BadMessage("the body is not valid base64") from None


def message_body(envelope: dict[str, Any]) -> bytes:
    """The body as kombu's ``Message`` ends up holding it: decompressed as its
    ``compression`` header says, text encoded as UTF-8."""
    body = channel_body(envelope)
    compression = (envelope.get("headers") or {}).get("compression")
    try:
        if compression:
            body = kombu_decompress(body, compression)
        return body.encode("utf-8") if isinstance(body, str) else bytes(body)
    except Exception as exc:  # an unknown or failed compression, a lone surrogate
        raise BadMessage(f"cannot decode the body: {_short(exc)}") from None


def decode_redis(raw: str | bytes) -> Delivery:
    """A message as kombu's Redis transport stores it -> a Delivery, or BadMessage (and
    nothing else, whatever ``raw`` holds). Each step is the one the worker takes: kombu's
    JSON, ``envelope_problem``, the body as kombu's ``Message`` holds it, its content type
    and encoding, ``from_celery``."""
    envelope = parse_envelope(raw)
    problem = envelope_problem(envelope)
    if problem:
        raise BadMessage(problem)
    problem = content_type_problem(envelope)
    if problem:
        raise BadMessage(problem)
    content_type = envelope.get("content-type")
    body, encoding = message_body(envelope), envelope.get("content-encoding")
    try:
        if encoding is None or encoding.lower() == "utf-8":
            payload = kombu_json(body.decode("utf-8"))  # kombu's registry, minus its lookups
        else:
            payload = kombu_loads(body, content_type, encoding, accept={CONTENT_TYPE})
    except Exception as exc:  # kombu wraps most in DecodeError; any other is a bad body too
        raise BadMessage(f"cannot decode the body: {_short(exc)}") from None
    return from_celery(envelope.get("headers"), payload)


def parse_envelope(raw: str | bytes) -> Any:
    """``raw`` parsed as kombu's Redis transport parses it, or BadMessage("not JSON")."""
    try:
        return kombu_json(bytes_to_str(raw))
    except Exception:  # ValueError, and what kombu's {"__type__": ...} hook or depth raise
        raise BadMessage("not JSON") from None


def kombu_json(text: str) -> Any:
    """``text`` parsed as kombu's JSON parses it: its hook turns each ``{"__type__": ...,
    "__value__": ...}`` object into a Python value. Text that cannot spell that key (neither
    the key nor a \\u escape in it) gets the same from plain ``json.loads``, at half the cost:
    this runs for every message a worker takes."""
    if "__type__" in text or "\\u" in text:
        return json_loads(text)
    return json.loads(text)


def from_celery(headers: Any, payload: Any) -> Delivery:
    """A Celery protocol-2 task message (its headers and decoded body) -> a Delivery, or
    BadMessage. Also checks what Celery's worker reads from it before the task runs (the
    ``id``, ``shadow``, ``eta``, ``expires`` and ``timelimit`` headers, the embedded
    callbacks), so a message accepted here cannot make Celery's strategy raise."""
    headers = headers if headers is not None else {}
    if not isinstance(headers, dict):
        raise BadMessage("the headers are not an object")
    if not isinstance(payload, list) or len(payload) != 3:
        raise BadMessage("the body is not a protocol-2 [args, kwargs, embed] list")
    if "task" not in headers:
        raise BadMessage("not a task message (no task header)")
    args, kwargs, embed = payload
    if embed is not None and (not isinstance(embed, dict) or any(embed.values())):
        raise BadMessage("the body's embed is not null callbacks, errbacks, chain and chord")
    if not isinstance(headers.get("id"), str) or not headers["id"]:
        raise BadMessage(f"the id header {_shown(headers.get('id'))} is not text")
    if not isinstance(headers.get("shadow"), str | type(None)):
        raise BadMessage(f"the shadow header {_shown(headers['shadow'])} is not text")
    for held in ("eta", "expires"):  # delays go through fanout's scheduler, never an ETA
        if headers.get(held) is not None:
            raise BadMessage(f"the {held} header {_shown(headers[held])} is set "
                             "(fanout's are null)")
    if not _time_limits(headers.get("timelimit")):
        raise BadMessage(f"the timelimit header {_shown(headers['timelimit'])} is not [hard, soft]")
    return from_task_call(headers.get("task"), args, kwargs, headers.get("retries"))


def _time_limits(value: Any) -> bool:
    if not value:
        return True
    return isinstance(value, list) and len(value) == 2 and all(
        v is None or (_is_number(v) and v >= 0) for v in value
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _short(exc: Exception) -> str:
    return _cut(f"{type(exc).__name__}: {exc}")


def _shown(value: Any) -> str:
    """A value for a one-line reason: its repr, cut."""
    return _cut(repr(value))


def _cut(text: str) -> str:
    text = " ".join(text.split())  # one line, whatever the value holds
    return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS - 3] + "..."


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
    if retries is not None and (not _is_whole(retries) or retries < 0):
        raise BadMessage(f"the retries header {_shown(retries)} is not a whole number")
    return _checked(Delivery(
        task=task, run_id=run_id, item_id=item_id, payload=payload,
        iteration=loop.get("iteration", 1), loop_payload=loop.get("payload"),
        attempt=(retries or 0) + 1,
    ))


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked(delivery: Delivery) -> Delivery:
    if not isinstance(delivery.task, str) or not _TASK_NAME.match(delivery.task):
        raise BadMessage(f"task {_shown(delivery.task)} is not a fanout stage (PIPELINE.STAGE)")
    if not isinstance(delivery.run_id, str) or not delivery.run_id:
        raise BadMessage("the run id is not text")
    if not isinstance(delivery.item_id, str) or ":" not in delivery.item_id:
        raise BadMessage(f"item id {_shown(delivery.item_id)} is not STAGE:ID")
    if not _is_whole(delivery.iteration) or delivery.iteration < 1:
        raise BadMessage(f"loop iteration {_shown(delivery.iteration)} is not a whole number >= 1")
    if not _is_whole(delivery.attempt) or delivery.attempt < 1:
        raise BadMessage(f"attempt {_shown(delivery.attempt)} is not a whole number >= 1")
    return delivery
