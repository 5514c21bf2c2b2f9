"""The scheduler (``workers/engine/scheduler.py``, ``lua/pop_due.lua``) on a real Redis, with a
fake clock moved by the tests: nothing sleeps."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import replace
from typing import Any

import pytest
import redis
from conftest import FakeClock

from workers import keys
from workers.engine.scheduler import Scheduler
from workers.ids import RawJSON
from workers.keys import RunKeys
from workers.message import Delivery, decode_redis
from workers.transport import RedisTransport

TTL_S = 600
T0 = 1_000_000.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


def make_scheduler(client: redis.Redis, clock: FakeClock) -> Scheduler:
    return Scheduler(client, RedisTransport(client, TTL_S), TTL_S, clock=clock)


@pytest.fixture
def scheduler(redis_client: redis.Redis, clock: FakeClock) -> Scheduler:
    return make_scheduler(redis_client, clock)


def delivery(n: int = 0, run_id: str = "run-1", **kw: Any) -> Delivery:
    return Delivery("demo.metric_day", run_id, f"metric_day:m{n}", {"n": n}, **kw)


QUEUE = delivery().queue


def queued(client: redis.Redis, queue: str = QUEUE) -> list[Delivery]:
    """The queue's messages, decoded, in the order they will be consumed."""
    return [decode_redis(raw) for raw in reversed(client.lrange(queue, 0, -1))]


def test_later_with_no_delay_publishes_at_once(
    scheduler: Scheduler, redis_client: redis.Redis
) -> None:
    d = delivery(1, iteration=2, loop_payload={"cursor": "c2"}, attempt=2)
    scheduler.later(d, 0)
    scheduler.later(delivery(2), -5)

    assert redis_client.llen(QUEUE) == 2
    assert queued(redis_client) == [d, delivery(2)]
    assert redis_client.zcard(keys.DELAYED) == 0
    assert redis_client.exists(RunKeys.of("run-1").delayed) == 0


def test_a_delayed_delivery_is_published_once_when_due(
    scheduler: Scheduler, redis_client: redis.Redis, clock: FakeClock
) -> None:
    d = delivery(1, iteration=3, loop_payload="cursor-3", attempt=2)
    scheduler.later(d, 30)

    assert redis_client.llen(QUEUE) == 0
    assert redis_client.zrange(keys.DELAYED, 0, -1, withscores=True) == [(d.to_json(), T0 + 30)]
    assert redis_client.zrange(RunKeys.of("run-1").delayed, 0, -1, withscores=True) == [
        (d.item_id, T0 + 30)]
    assert 0 < redis_client.ttl(keys.DELAYED) <= TTL_S
    assert 0 < redis_client.ttl(RunKeys.of("run-1").delayed) <= TTL_S

    clock.advance(29.5)
    assert scheduler.move_due() == 0
    assert redis_client.llen(QUEUE) == 0

    clock.advance(1)
    assert scheduler.move_due() == 1
    assert redis_client.llen(QUEUE) == 1
    assert queued(redis_client) == [d]
    assert redis_client.zcard(keys.DELAYED) == 0
    assert redis_client.exists(RunKeys.of("run-1").delayed) == 0

    clock.advance(100)
    assert scheduler.move_due() == 0
    assert redis_client.llen(QUEUE) == 1


def test_a_raw_json_payload_is_published_as_its_value(
    scheduler: Scheduler, redis_client: redis.Redis, clock: FakeClock
) -> None:
    d = Delivery("demo.services", "run-1", "services:s1", RawJSON('{"a":[1,2],"b":"x"}'))
    scheduler.later(d, 5)
    clock.advance(5)
    assert scheduler.move_due() == 1
    assert queued(redis_client, d.queue) == [replace(d, payload={"a": [1, 2], "b": "x"})]


def test_only_what_is_due_moves_in_due_order(
    scheduler: Scheduler, redis_client: redis.Redis, clock: FakeClock
) -> None:
    for n, delay in ((1, 30), (2, 10), (3, 20), (4, 60)):
        scheduler.later(delivery(n), delay)

    clock.advance(25)
    assert scheduler.move_due() == 2
    assert queued(redis_client) == [delivery(2), delivery(3)]
    assert scheduler.waiting_items("run-1", clock()) == {"metric_day:m1", "metric_day:m4"}
    clock.advance(10)
    assert scheduler.move_due() == 1
    assert [d.item_id for d in queued(redis_client)] == [
        "metric_day:m2", "metric_day:m3", "metric_day:m1"]
    assert redis_client.zrange(keys.DELAYED, 0, -1) == [delivery(4).to_json()]


def test_two_schedulers_publish_each_due_delivery_once_in_total(
    redis_url: str, redis_client: redis.Redis, clock: FakeClock
) -> None:
    workers = [
        make_scheduler(redis.Redis.from_url(redis_url, decode_responses=True), clock)
        for _ in range(2)
    ]
    for n in range(40):
        workers[n % 2].later(delivery(n), 1 + n % 7)
    clock.advance(10)

    # One after the other: the second finds nothing left.
    first = workers[0].move_due()
    assert (first, workers[1].move_due()) == (40, 0)

    # At the same time, over a few rounds.
    moved = [0, 0]
    for round_ in range(5):
        for n in range(100 + 20 * round_, 120 + 20 * round_):
            workers[n % 2].later(delivery(n), 1)
        clock.advance(2)
        barrier = threading.Barrier(2)

        def move(i: int, barrier: threading.Barrier) -> None:
            barrier.wait()
            moved[i] += workers[i].move_due()

        threads = [threading.Thread(target=move, args=(i, barrier)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert sum(moved) == 100
    items = [d.item_id for d in queued(redis_client)]
    assert len(items) == 140
    expected = {f"metric_day:m{n}" for n in (*range(40), *range(100, 200))}
    assert set(items) == expected
    assert redis_client.zcard(keys.DELAYED) == 0


def test_waiting_items_lists_an_item_while_it_waits(
    scheduler: Scheduler, redis_client: redis.Redis, clock: FakeClock
) -> None:
    scheduler.later(delivery(1), 30)
    scheduler.later(delivery(2, run_id="run-2"), 30)

    assert scheduler.waiting_items("run-1", T0) == {"metric_day:m1"}
    assert scheduler.waiting_items("run-1", T0 + 30) == {"metric_day:m1"}  # due at T0 + 30
    assert scheduler.waiting_items("run-1", T0 + 31) == set()  # an older entry: a leftover
    assert scheduler.waiting_items("run-3", T0) == set()

    clock.advance(31)
    assert scheduler.move_due() == 2
    assert scheduler.waiting_items("run-1", T0) == set()
    assert scheduler.waiting_items("run-2", T0) == set()
    assert redis_client.exists(RunKeys.of("run-1").delayed) == 0


def test_a_malformed_member_is_dropped_and_the_others_are_published(
    scheduler: Scheduler, redis_client: redis.Redis, clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = [delivery(1), delivery(2, attempt=3)]
    for d in good:
        scheduler.later(d, 5)
    no_task = json.loads(delivery(3).to_json())
    del no_task["task"]
    bad_task = {**json.loads(delivery(4).to_json()), "task": "not a stage"}
    malformed = ["not json", "[1, 2, 3]", json.dumps(no_task), json.dumps(bad_task)]
    redis_client.zadd(keys.DELAYED, dict.fromkeys(malformed, T0 + 1))
    clock.advance(5)

    with caplog.at_level(logging.ERROR, logger="fanout.scheduler"):
        assert scheduler.move_due() == 6

    assert queued(redis_client) == good
    assert redis_client.zcard(keys.DELAYED) == 0
    errors = [r.getMessage() for r in caplog.records if r.name == "fanout.scheduler"]
    assert len(errors) == 4
    assert all(e.startswith("dropped a malformed delayed entry: ") for e in errors)
    assert "not a fanout stage" in errors[3]
    assert scheduler.move_due() == 0


def test_a_member_with_a_bad_attempt_does_not_lose_the_others(
    scheduler: Scheduler, redis_client: redis.Redis, clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = [delivery(1), delivery(2)]
    for d in good:
        scheduler.later(d, 5)
    bad = {**json.loads(delivery(3).to_json()), "attempt": None}
    redis_client.zadd(keys.DELAYED, {json.dumps(bad): T0 + 1})
    clock.advance(5)

    # Any exception (the TypeError it once raised, after the batch had left the delayed set,
    # losing the good two) fails the test.
    with caplog.at_level(logging.ERROR, logger="fanout.scheduler"):
        assert scheduler.move_due() == 3
    assert queued(redis_client) == good
    assert redis_client.zcard(keys.DELAYED) == 0
    errors = [r.getMessage() for r in caplog.records if r.name == "fanout.scheduler"]
    assert len(errors) == 1 and errors[0].startswith("dropped a malformed delayed entry: ")
