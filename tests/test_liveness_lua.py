"""Contract of the liveness scripts (``lua/heartbeat.lua``, ``dead_workers.lua``,
``forget_worker.lua``) through ``workers.liveness.Liveness``, on a real Redis, with kombu's
unacked index written as kombu writes it. Times are the server's (``TIME``); a dead worker
is one whose last beat is set in the past by hand, never waited for."""

from __future__ import annotations

import redis

from workers import keys
from workers.liveness import Liveness

TTL_S = 600
INDEX = "unacked_index"


def server_now_s(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def liveness(client: redis.Redis) -> Liveness:
    return Liveness(client, TTL_S, INDEX, heartbeat_ttl_s=10)


def test_a_beat_marks_the_worker_alive_at_server_time_and_renews_what_it_holds(
    redis_client: redis.Redis,
) -> None:
    redis_client.zadd(INDEX, {"t1": 1000.0, "t2": 1000.0, "other": 1000.0})
    redis_client.sadd(keys.worker_held("w1"), "t1", "t2")

    before = server_now_s(redis_client)
    # t3: acknowledged meanwhile (not in kombu's index): not added back.
    assert liveness(redis_client).beat("w1", ["t1", "t2", "t3"]) == 2
    after = server_now_s(redis_client)

    beat = redis_client.zscore(keys.WORKERS, "w1")
    assert beat is not None and before <= beat <= after
    scores = dict(redis_client.zrange(INDEX, 0, -1, withscores=True))
    assert set(scores) == {"t1", "t2", "other"}
    assert before <= scores["t1"] <= after and before <= scores["t2"] <= after
    assert scores["other"] == 1000.0  # another worker's message: its lease is its own
    for key in (keys.WORKERS, keys.worker_held("w1")):
        assert 0 < redis_client.ttl(key) <= TTL_S


def test_a_beat_drops_from_the_held_set_what_kombu_no_longer_has(
    redis_client: redis.Redis,
) -> None:
    redis_client.zadd(INDEX, {"kept": 1000.0})
    redis_client.sadd(keys.worker_held("w1"), "kept", "acked", "restored")

    assert liveness(redis_client).beat("w1", ["kept"]) == 1

    assert redis_client.smembers(keys.worker_held("w1")) == {"kept"}
    assert liveness(redis_client).held("w1") == ["kept"]


def test_dead_workers_are_those_silent_for_the_heartbeat_ttl(
    redis_client: redis.Redis,
) -> None:
    now = server_now_s(redis_client)
    redis_client.zadd(keys.WORKERS, {"long-dead": now - 300, "dead": now - 11,
                                     "slow": now - 9, "fresh": now})
    live = liveness(redis_client)

    assert live.dead() == ["long-dead", "dead"]
    live.beat("dead", [])  # it beat again: alive
    assert live.dead() == ["long-dead"]


def test_forget_drops_a_dead_worker_and_its_held_set_but_not_one_that_beat_again(
    redis_client: redis.Redis,
) -> None:
    now = server_now_s(redis_client)
    redis_client.zadd(keys.WORKERS, {"dead": now - 60, "back": now - 60, "live": now})
    for worker in ("dead", "back", "live"):
        redis_client.sadd(keys.worker_held(worker), "t")
        redis_client.sadd(keys.worker_queues(worker), "fanout.demo.metric_day")
    live = liveness(redis_client)
    redis_client.zadd(INDEX, {"t": 1000.0})
    live.beat("back", ["t"])

    assert live.forget("dead") is True
    assert live.forget("dead") is False  # once
    assert live.forget("back") is False
    assert live.forget("live") is False
    assert live.forget("never-seen") is False

    assert sorted(redis_client.zrange(keys.WORKERS, 0, -1)) == ["back", "live"]
    assert redis_client.exists(keys.worker_held("dead"), keys.worker_queues("dead")) == 0
    assert live.claim_queues("back") == ["fanout.demo.metric_day"]
    assert redis_client.smembers(keys.worker_held("back")) == {"t"}
