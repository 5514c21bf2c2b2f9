"""The delivery codec (``workers/message.py``): round trips, equality with what kombu's own
producer stores on a Redis queue, and the reasons a bad message is refused."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

import kombu
import pytest
import redis

from workers.ids import RawJSON
from workers.message import BadMessage, Delivery, decode_redis, encode_redis, from_task_call

FIRST = Delivery("demo.accounts", "20240101-000000-abc123", "accounts:0f1e2d3c4b5a6978",
                 {"account": "a1"})
LATER = replace(FIRST, iteration=4, loop_payload={"cursor": "c4", "seen": [1, 2, 3]})
THIRD_ATTEMPT = replace(FIRST, attempt=3)
RAW = Delivery("demo.metric_day", "run-1", "metric_day:ab12",
               RawJSON('{"account":"a1","day":"2024-01-02","service":"s\\u00e9"}'))
DELIVERIES = {"first": FIRST, "later_iteration": LATER, "attempt_3": THIRD_ATTEMPT,
              "raw_json": RAW}


def decoded_form(d: Delivery) -> Delivery:
    """What decoding gives back: a RawJSON payload comes back as the value it spells."""
    return replace(d, payload=json.loads(d.payload)) if isinstance(d.payload, RawJSON) else d


@pytest.mark.parametrize("d", DELIVERIES.values(), ids=DELIVERIES.keys())
def test_encode_then_decode_gives_back_the_delivery(d: Delivery) -> None:
    back = decode_redis(encode_redis(d))
    assert back == decoded_form(d)
    assert back.task_id == d.task_id
    # And from bytes, as a client without decode_responses reads it.
    assert decode_redis(encode_redis(d).encode()) == decoded_form(d)


def test_the_decoded_fields() -> None:
    back = decode_redis(encode_redis(replace(LATER, attempt=2)))
    assert (back.pipeline, back.stage, back.queue) == ("demo", "accounts", "fanout.demo.accounts")
    assert (back.iteration, back.loop_payload, back.attempt) == (4, LATER.loop_payload, 2)
    assert back.task_id == f"{FIRST.run_id}.{FIRST.item_id}.4"
    assert decode_redis(encode_redis(FIRST)).task_id == f"{FIRST.run_id}.{FIRST.item_id}"


def test_each_message_has_its_own_delivery_tag() -> None:
    tags = {json.loads(encode_redis(FIRST))["properties"]["delivery_tag"] for _ in range(100)}
    assert len(tags) == 100


@pytest.mark.parametrize("d", DELIVERIES.values(), ids=DELIVERIES.keys())
def test_encode_redis_equals_what_kombu_stores(
    d: Delivery, redis_url: str, redis_client: redis.Redis
) -> None:
    with kombu.Connection(redis_url) as conn:
        conn.Producer().publish(
            d.body(), exchange="", routing_key=d.queue, headers=d.headers(),
            content_type="application/json", content_encoding="utf-8", delivery_mode=2,
            declare=[kombu.Queue(d.queue, kombu.Exchange(""), routing_key=d.queue)],
        )
    [raw] = redis_client.lrange(d.queue, 0, -1)
    assert decode_redis(raw) == decoded_form(d)  # kombu's base64 body decodes too

    kombu_stored = json.loads(raw)
    ours = json.loads(encode_redis(d))
    assert kombu_stored["properties"].pop("body_encoding") == "base64"
    assert "body_encoding" not in ours["properties"]  # our body is plain JSON text
    kombu_stored["body"] = base64.b64decode(kombu_stored["body"]).decode()
    for envelope in (kombu_stored, ours):
        tag = envelope["properties"]["delivery_tag"]
        assert isinstance(tag, str) and tag
        envelope["properties"]["delivery_tag"] = "<tag>"
    assert ours == kombu_stored


# -- refused messages ---------------------------------------------------------------------


def envelope(d: Delivery = FIRST) -> dict[str, Any]:
    return dict(json.loads(encode_redis(d)))


def with_body(args: Any, kwargs: Any) -> str:
    env = envelope()
    env["body"] = json.dumps([args, kwargs, {}])
    return json.dumps(env)


def with_headers(**headers: Any) -> str:
    env = envelope()
    env["headers"].update(headers)
    return json.dumps(env)


def with_content_type(content_type: str) -> str:
    env = envelope()
    env["content-type"] = content_type
    return json.dumps(env)


def without_tag() -> str:
    env = envelope()
    del env["properties"]["delivery_tag"]
    return json.dumps(env)


def bad_base64() -> str:
    env = envelope()
    env["properties"]["body_encoding"] = "base64"
    env["body"] = "a"
    return json.dumps(env)


def base64_of(body: str) -> str:
    env = envelope()
    env["properties"]["body_encoding"] = "base64"
    env["body"] = base64.b64encode(body.encode()).decode()
    return json.dumps(env)


def with_properties(**properties: Any) -> str:
    env = envelope()
    env["properties"].update(properties)
    return json.dumps(env)


ARGS = [FIRST.run_id, FIRST.item_id, FIRST.payload]
REFUSED = {
    "plain_text": ("hello, world", "not JSON"),
    "empty": ("", "not JSON"),
    "json_list": ("[1, 2, 3]", "the envelope is a JSON list, not an object"),
    "json_number": ("42", "the envelope is a JSON int, not an object"),
    "other_object": ('{"task": "demo.accounts", "args": []}',
                     "the envelope has no properties object"),
    "no_delivery_tag": (without_tag(), "the envelope has no delivery_tag"),
    "pickle": (with_content_type("application/x-python-serialize"),
               "content type 'application/x-python-serialize' is not application/json"),
    "yaml": (with_content_type("application/x-yaml"),
             "content type 'application/x-yaml' is not application/json"),
    "bad_base64": (bad_base64(), "the body is not valid base64"),
    # The three shapes that killed every worker (issue #23).
    "base64_empty_list": (base64_of("[]"),
                          "the body is not a protocol-2 [args, kwargs, embed] list"),
    "base64_object": (base64_of('{"a": 1}'),
                      "the body is not a protocol-2 [args, kwargs, embed] list"),
    "no_delivery_info": (with_properties(delivery_info=None),
                         "the envelope has no delivery_info with exchange and routing_key"),
    "no_routing_key": (with_properties(delivery_info={"exchange": ""}),
                       "the envelope has no delivery_info with exchange and routing_key"),
    "tag_object": (with_properties(delivery_tag={"a": 1}),
                   "the envelope's delivery_tag is not text"),
    "body_encoding_gzip": (with_properties(body_encoding="gzip"),
                           "body encoding 'gzip' is not base64 or utf-8"),
    "no_task_header": (json.dumps({**envelope(), "headers": {"id": "x"}}),
                       "not a task message (no task header)"),
    "id_missing": (with_headers(id=None), "the id header None is not text"),
    "shadow_number": (with_headers(shadow=3), "the shadow header 3 is not text"),
    "eta_set": (with_headers(eta="2030-01-01T00:00:00"),
                "the eta header '2030-01-01T00:00:00' is set (fanout's are null)"),
    "eta_empty_list": (with_headers(eta=[]), "the eta header [] is set (fanout's are null)"),
    "timelimit_text": (with_headers(timelimit="soon"),
                       "the timelimit header 'soon' is not [hard, soft]"),
    "embed_callback": (json.dumps({**envelope(), "body": json.dumps([ARGS, {}, {
        "callbacks": [{"task": "x"}]}])}),
        "the body's embed is not null callbacks, errbacks, chain and chord"),
    "retries_bool": (with_headers(retries=True), "the retries header True is not a whole number"),
    "body_not_protocol_2": (json.dumps({**envelope(), "body": '{"args": []}'}),
                            "the body is not a protocol-2 [args, kwargs, embed] list"),
    "task_without_stage": (with_headers(task="accounts"),
                           "task 'accounts' is not a fanout stage (PIPELINE.STAGE)"),
    "task_of_celery": (with_headers(task="celery.chord.unlock"),
                       "task 'celery.chord.unlock' is not a fanout stage (PIPELINE.STAGE)"),
    "task_upper_case": (with_headers(task="Demo.Accounts"),
                        "task 'Demo.Accounts' is not a fanout stage (PIPELINE.STAGE)"),
    "task_missing": (with_headers(task=None),
                     "task None is not a fanout stage (PIPELINE.STAGE)"),
    "two_args": (with_body(ARGS[:2], {}), "args are not [run_id, item_id, item]"),
    "four_args": (with_body([*ARGS, 1], {}), "args are not [run_id, item_id, item]"),
    "args_object": (with_body({"run_id": "r"}, {}), "args are not [run_id, item_id, item]"),
    "other_kwarg": (with_body(ARGS, {"page": 2}), "kwargs are not {} or {'loop': ...}"),
    "loop_not_object": (with_body(ARGS, {"loop": 5}), "the loop kwarg is not an object"),
    "loop_list": (with_body(ARGS, {"loop": [2, "c"]}), "the loop kwarg is not an object"),
    "loop_iteration_0": (with_body(ARGS, {"loop": {"iteration": 0, "payload": "c"}}),
                         "loop iteration 0 is not a whole number >= 1"),
    "loop_iteration_text": (with_body(ARGS, {"loop": {"iteration": "2"}}),
                            "loop iteration '2' is not a whole number >= 1"),
    "retries_negative": (with_headers(retries=-1),
                         "the retries header -1 is not a whole number"),
    "retries_text": (with_headers(retries="1"),
                     "the retries header '1' is not a whole number"),
    "run_id_empty": (with_body(["", FIRST.item_id, {}], {}), "the run id is not text"),
    "item_id_without_stage": (with_body([FIRST.run_id, "abc", {}], {}),
                              "item id 'abc' is not STAGE:ID"),
}


@pytest.mark.parametrize(("raw", "reason"), REFUSED.values(), ids=REFUSED.keys())
def test_decode_redis_refuses_a_bad_message_with_its_reason(raw: str, reason: str) -> None:
    with pytest.raises(BadMessage) as refused:
        decode_redis(raw)
    assert refused.value.reason == reason
    assert str(refused.value) == reason


def test_a_reason_shows_a_long_value_cut_on_one_line() -> None:
    with pytest.raises(BadMessage) as refused:
        decode_redis(with_headers(id={"x": "line\n" * 10_000}))
    assert refused.value.reason.startswith("the id header {'x': 'line\\nline")
    assert refused.value.reason.endswith("... is not text")
    assert len(refused.value.reason) < 160 and "\n" not in refused.value.reason


@pytest.mark.parametrize("marker", [
    {"__type__": "bytes", "__value__": 5}, {"__type__": "decimal", "__value__": "1.2.3"},
    {"__type__": "nosuch", "__value__": 1},
], ids=["bytes_of_a_number", "bad_decimal", "unknown_type"])
def test_a_kombu_type_marker_kombu_cannot_decode_is_refused(marker: dict[str, Any]) -> None:
    """kombu's JSON hook raises AttributeError or InvalidOperation on these, not ValueError."""
    with pytest.raises(BadMessage, match=r"^cannot decode the body: "):
        decode_redis(with_body([FIRST.run_id, FIRST.item_id, marker], {}))
    with pytest.raises(BadMessage, match=r"^not JSON$"):
        decode_redis(json.dumps({**envelope(), "headers": marker}))


@pytest.mark.parametrize("loop", [[], 0, "", False], ids=["list", "zero", "text", "false"])
def test_a_falsy_loop_kwarg_that_is_not_an_object_is_refused(loop: Any) -> None:
    with pytest.raises(BadMessage, match="the loop kwarg is not an object"):
        decode_redis(with_body(ARGS, {"loop": loop}))


def test_from_task_call_builds_the_delivery() -> None:
    assert from_task_call("demo.accounts", ARGS, {}, None) == FIRST
    assert from_task_call("demo.accounts", tuple(ARGS), {}, 2) == replace(FIRST, attempt=3)
    loop = {"iteration": 4, "payload": LATER.loop_payload}
    assert from_task_call("demo.accounts", ARGS, {"loop": loop}, 0) == LATER
    assert from_task_call("demo.accounts", ARGS, {"loop": None}, None) == FIRST


@pytest.mark.parametrize("args", [
    None, "run-1", {"run_id": "r"}, [], ARGS[:2], [*ARGS, None], 3,
], ids=["none", "text", "object", "empty", "two", "four", "number"])
def test_from_task_call_refuses_wrong_args(args: Any) -> None:
    with pytest.raises(BadMessage) as refused:
        from_task_call("demo.accounts", args, {}, None)
    assert refused.value.reason == "args are not [run_id, item_id, item]"


@pytest.mark.parametrize(("args", "kwargs", "retries", "reason"), [
    (ARGS, [], None, "kwargs are not {} or {'loop': ...}"),
    (ARGS, None, None, "kwargs are not {} or {'loop': ...}"),
    (ARGS, {"loop": "c"}, None, "the loop kwarg is not an object"),
    (ARGS, {}, 1.5, "the retries header 1.5 is not a whole number"),
    ([7, FIRST.item_id, {}], {}, None, "the run id is not text"),
    ([FIRST.run_id, 7, {}], {}, None, "item id 7 is not STAGE:ID"),
], ids=["kwargs_list", "kwargs_none", "loop_text", "retries_float", "run_id_number",
        "item_id_number"])
def test_from_task_call_refuses_other_bad_calls(
    args: Any, kwargs: Any, retries: Any, reason: str
) -> None:
    with pytest.raises(BadMessage) as refused:
        from_task_call("demo.accounts", args, kwargs, retries)
    assert refused.value.reason == reason
