"""Property-based fuzzing of the decode path: whatever a queue holds, each layer the worker
runs it through (fanout's transport check, kombu's ``Message``, the consumer's check, Celery's
``Request``; and ``decode_redis`` for claimed batches) either gives a valid Delivery or a
dead letter with its reason, and never raises anything else. The functions called are the
worker's own, on a real Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import kombu
import pytest
import redis
from celery import Celery
from celery.exceptions import InvalidTaskError
from celery.worker.request import Request
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from kombu.utils.json import loads as kombu_loads
from queue_payloads import json_values, known_killers, raw_payloads

from workers import broker, keys
from workers.api import find_stage
from workers.app import create_app
from workers.consumer import message_problem
from workers.engine.services import services
from workers.message import BadMessage, Delivery, decode_redis, from_celery, kombu_json

QUEUE = keys.queue_name("demo", "metric_day")
KILLERS = known_killers()
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def app() -> Celery:
    return create_app()


@pytest.fixture
def channel(redis_url: str) -> Iterator[Any]:
    # Named, not through broker.install(): kombu caches the alias's class once resolved.
    with kombu.Connection(redis_url, transport=broker.Transport) as connection:
        assert isinstance(connection.default_channel, broker.Channel)
        yield connection.default_channel


def dead_letters(client: redis.Redis) -> list[Any]:
    return [*client.lrange(keys.dead_letters(QUEUE), 0, -1)]


def through_the_worker(raw: str | bytes, channel: Any, app: Celery) -> Delivery | str:
    """``raw`` as the worker takes it off ``QUEUE``: a Delivery Celery will run, or why one
    of the layers refused it (the transport keeps it as a dead letter itself; a reason of a
    later layer is what ``Consumer`` keeps one with)."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    envelope = broker._envelope_or_dead_letter(QUEUE, text)  # what _brpop_read calls
    if envelope is None:
        return "dead letter"
    message = channel.Message(envelope, channel=channel)  # what kombu's callback builds
    message.accept = {"application/json"}  # set by kombu's consumer, from accept_content
    if message.errors:
        return "cannot decode"  # Celery's consumer: on_decode_error, our dead letter
    problem = message_problem(message)
    if problem is not None:
        return problem
    delivery = from_celery(message.headers, message.payload)
    # What Celery's strategy and Request then do with it must not raise either, except
    # InvalidTaskError (a bad eta or expires header), which Celery gives on_invalid_task.
    assert "args" not in message.payload
    try:
        request = Request(message, app=app, task=app.tasks[delivery.task])
    except InvalidTaskError as exc:
        return str(exc)
    assert len(request.time_limits) == 2  # what execute_using_pool unpacks
    assert request.id == message.headers["id"]
    return delivery


def with_known_killers(test: Any) -> Any:
    for raw in KILLERS:
        test = example(raw=raw)(test)
    return test


@FUZZ
@given(raw=raw_payloads)
@with_known_killers
def test_each_queue_payload_is_a_delivery_or_a_dead_letter(
    raw: str | bytes, channel: Any, app: Celery, redis_client: redis.Redis
) -> None:
    before = len(dead_letters(redis_client))
    taken = through_the_worker(raw, channel, app)
    added = dead_letters(redis_client)[before:]
    event("a delivery" if isinstance(taken, Delivery) else f"refused: {taken[:40]}")
    if isinstance(taken, Delivery):
        assert added == []
        assert decode_redis(raw) == taken  # the claimed-batch path agrees
        return
    assert taken  # a reason
    assert len(added) == (1 if taken == "dead letter" else 0)
    try:  # and the claimed-batch path refuses it too, or finds no stage for its task
        claimed = decode_redis(raw)
    except BadMessage as exc:
        assert exc.reason
    else:
        assert find_stage(claimed.task) is None or "invalid" in taken.lower() \
            or "eta" in taken or "expires" in taken, (raw, taken)


@FUZZ
@given(raw=raw_payloads)
@with_known_killers
def test_decode_redis_gives_a_delivery_or_bad_message_only(raw: str | bytes) -> None:
    try:
        delivery = decode_redis(raw)
    except BadMessage as exc:
        assert isinstance(exc.reason, str) and exc.reason and "\n" not in exc.reason
        assert len(exc.reason) <= 300
    else:
        assert isinstance(delivery, Delivery)
        assert delivery.task.count(".") == 1 and ":" in delivery.item_id


@FUZZ
@given(value=json_values, ensure_ascii=st.booleans())
def test_kombu_json_parses_as_kombu_does(value: Any, ensure_ascii: bool) -> None:
    """Its plain json.loads shortcut gives what kombu's own loads gives, markers and all."""
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    try:
        expected = kombu_loads(text)
    except Exception as exc:
        with pytest.raises(type(exc)):
            kombu_json(text)
    else:
        assert repr(kombu_json(text)) == repr(expected)  # NaN != NaN, but reprs agree


def test_the_refusals_are_kept_with_their_reason(redis_client: redis.Redis) -> None:
    """The transport layer keeps the raw text and the reason (the fuzz above counts them)."""
    assert broker._envelope_or_dead_letter(QUEUE, "not json") is None
    [letter] = services().dead_letters.list()
    assert (letter.queue, letter.reason, letter.raw) == (QUEUE, "not JSON", "not json")
