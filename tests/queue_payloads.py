"""What a queue can hold, for the tests of the decode path: hypothesis strategies of raw queue
payloads (anything, from random bytes to valid deliveries), and a seeded generator of
payloads that are each certainly malformed (for the live test: every one must end a dead
letter)."""

from __future__ import annotations

import base64
import copy
import json
import random
from typing import Any

from hypothesis import strategies as st

from workers.message import Delivery, encode_redis

STAGES = ("demo.accounts", "demo.services", "demo.metric_day")
ENVELOPE_FIELDS = (
    "body", "content-type", "content-encoding", "headers", "properties",
    "headers.task", "headers.id", "headers.retries", "headers.timelimit", "headers.shadow",
    "headers.eta", "headers.expires", "headers.compression", "properties.delivery_tag",
    "properties.delivery_info", "properties.delivery_info.routing_key",
    "properties.delivery_info.exchange", "properties.body_encoding", "properties.priority",
)
#: Values a field of a real message might hold, right for one field and wrong for another.
PLAUSIBLE = st.sampled_from([
    "", "zlib", "application/x-nosuch", "base64", "utf-8", "application/json",
    "2030-01-01T00:00:00", "demo.accounts", 0, 1, -1, 2.5, [1, 2], [None, None], {}, True,
])
#: kombu's JSON hook turns these into Python objects, or raises something not a ValueError.
KOMBU_MARKERS = (
    {"__type__": "bytes", "__value__": 5}, {"__type__": "datetime", "__value__": "x"},
    {"__type__": "decimal", "__value__": "1.2.3"}, {"__type__": "uuid", "__value__": []},
    {"__type__": "nosuch", "__value__": 1}, {"__type__": "base64", "__value__": "a"},
)

def _json(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                        max_leaves=6)


_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
plain_json = _json(_SCALARS)  # what kombu's JSON gives back as it is
json_values = _json(_SCALARS | st.sampled_from(KOMBU_MARKERS).map(copy.deepcopy))


deliveries = st.builds(
    Delivery,
    task=st.sampled_from(STAGES),
    run_id=st.text(min_size=1, max_size=12),
    item_id=st.builds(lambda s, i: f"{s}:{i}", st.sampled_from(["accounts", "x"]),
                      st.text(max_size=8)),
    payload=plain_json,
    iteration=st.integers(1, 5),
    loop_payload=plain_json,
    attempt=st.integers(1, 5),
)


def set_path(envelope: dict[str, Any], path: str, value: Any, delete: bool = False) -> None:
    target: Any = envelope
    *parents, last = path.split(".")
    for key in parents:
        if not isinstance(target, dict) or not isinstance(target.get(key), dict):
            return
        target = target[key]
    if delete:
        target.pop(last, None)
    else:
        target[last] = copy.deepcopy(value)  # never share a drawn value between fields


def base64_body(envelope: dict[str, Any], text: str) -> dict[str, Any]:
    """The envelope with ``text`` as its body, base64-encoded as kombu's producer stores it."""
    envelope["body"] = base64.b64encode(text.encode("utf-8", "surrogatepass")).decode()
    envelope["properties"]["body_encoding"] = "base64"
    return envelope


@st.composite
def envelopes(draw: st.DrawFn) -> str:
    """A valid delivery's envelope with some fields deleted or set to random values, its body
    maybe replaced (by random JSON, a protocol-2 list of random parts, or text that is not
    base64) and maybe base64-encoded."""
    envelope = json.loads(encode_redis(draw(deliveries)))
    for path in draw(st.lists(st.sampled_from(ENVELOPE_FIELDS), max_size=3)):
        set_path(envelope, path, draw(PLAUSIBLE | json_values), delete=draw(st.booleans()))
    body = draw(st.sampled_from(["keep", "json", "call", "call", "call", "text"]))
    if body == "json":
        envelope["body"] = json.dumps(draw(json_values))
    elif body == "call":
        near_args = st.tuples(st.text(max_size=4) | json_values,
                              st.sampled_from(["accounts:1", "x"]) | json_values,
                              json_values).map(list)
        args = draw(near_args | st.lists(json_values, max_size=4) | json_values)
        loops = st.fixed_dictionaries({}, optional={
            "iteration": st.integers(-1, 3) | json_values, "payload": json_values,
        }) | json_values
        kwargs = draw(st.fixed_dictionaries({}, optional={"loop": loops}) | json_values)
        envelope["body"] = json.dumps([args, kwargs, draw(st.none() | json_values)])
    elif body == "text":
        envelope["body"] = draw(st.text(max_size=12))
    if isinstance(envelope.get("body"), str) and isinstance(envelope.get("properties"), dict) \
            and draw(st.booleans()):
        base64_body(envelope, envelope["body"])
    return json.dumps(envelope)


@st.composite
def one_field_off(draw: st.DrawFn) -> str:
    """A valid delivery's envelope with exactly one field deleted or set to another value:
    the message that passes every check but one."""
    envelope = json.loads(encode_redis(draw(deliveries)))
    set_path(envelope, draw(st.sampled_from(ENVELOPE_FIELDS)), draw(PLAUSIBLE | json_values),
             delete=draw(st.booleans()))
    return json.dumps(envelope)


raw_payloads = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64),
    json_values.map(json.dumps),
    envelopes(),
    one_field_off(), one_field_off(), one_field_off(),  # the likeliest to slip through
    deliveries.map(encode_redis),
)


def known_killers() -> list[str]:
    """Each kind ``malformed`` makes, once: the fuzz tests run them as explicit examples."""
    return [raw for _, raw in _broken("demo.services", random.Random(0))]


# -- certainly malformed, for a live run ----------------------------------------------------


def _envelope(task: str, rng: random.Random) -> dict[str, Any]:
    stage = task.split(".")[1]
    delivery = Delivery(task, f"bad-{rng.randrange(10**9)}", f"{stage}:{rng.randrange(10**9)}",
                        {})
    return dict(json.loads(encode_redis(delivery)))


def _broken(task: str, rng: random.Random) -> list[tuple[str, str]]:
    """(kind, raw) of each way to break a message for ``task``; each must be refused."""
    def env(changes: dict[str, Any] | None = None) -> dict[str, Any]:
        envelope = _envelope(task, rng)
        for path, value in (changes or {}).items():
            set_path(envelope, path, value)
        return envelope

    def call(args: Any, kwargs: Any) -> str:
        return json.dumps(env({"body": json.dumps([args, kwargs, None])}))

    return [
        ("base64 body of []", json.dumps(base64_body(env(), "[]"))),
        ('base64 body of {"a": 1}', json.dumps(base64_body(env(), '{"a": 1}'))),
        ("body not base64", json.dumps(env({"properties.body_encoding": "base64", "body": "a"}))),
        ("random bytes", rng.randbytes(rng.randrange(1, 40)).decode("latin-1")),
        ("not JSON", "{" + str(rng.random())),
        ("a JSON list", json.dumps([rng.random()])),
        ("plain body []", json.dumps(env({"body": "[]"}))),
        ("body of a number", json.dumps(env({"body": str(rng.randrange(100))}))),
        ("two args", call(["r", "x:1"], {})),
        ("kwargs a list", call(["r", "x:1", {}], [])),
        ("unknown task", json.dumps(env({"headers.task": "demo.nosuch"}))),
        ("task a list", json.dumps(env({"headers.task": ["demo"]}))),
        ("no id header", json.dumps(env({"headers.id": None}))),
        ("timelimit text", json.dumps(env({"headers.timelimit": "soon"}))),
        ("pickle", json.dumps(env({"content-type": "application/x-python-serialize"}))),
        ("no delivery_info", json.dumps(env({"properties.delivery_info": None}))),
        ("tag an object", json.dumps(env({"properties.delivery_tag": {"a": 1}}))),
        ("kombu bytes marker", call(["r", "x:1", {"__type__": "bytes", "__value__": 5}], {})),
        ("lone surrogate body", json.dumps(env({"body": "\ud800"}))),
        ("unknown compression", json.dumps(env({"headers.compression": "application/x-nosuch"}))),
        ("eta set", json.dumps(env({"headers.eta": "2030-01-01T00:00:00"}))),
        ("a callback", json.dumps(env({"body": json.dumps(
            [["r", "x:1", {}], {}, {"callbacks": [{"task": "celery.backend_cleanup"}]}])}))),
        ("loop iteration 0", call(["r", "x:1", {}], {"loop": {"iteration": 0}})),
    ]


def malformed(task: str, count: int, seed: int) -> list[str]:
    """``count`` malformed messages for ``task``, every kind at least once when count allows."""
    rng = random.Random(seed)
    found: list[str] = []
    while len(found) < count:
        found.extend(raw for _, raw in _broken(task, rng))
    return found[:count]
