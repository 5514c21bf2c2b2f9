"""Contract of the global limits (``workers/limits.py``, ``lua/limit_*.lua``) on a real Redis.

The scripts compute waits and TTLs on Redis server time, so each is checked against the
server time that passed around the calls (``ServerSpan``), not against a tolerance a slow
machine could exceed. Where a test needs time to pass (a lease running out, a push-back
ending), it waits for the server's clock to pass that moment; where it needs time not to pass
(a refusal), the intervals are seconds, not milliseconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from workers.limits import (
    LIMITS_INDEX,
    LimitConfig,
    LimitKeys,
    Limits,
    SlotUnavailable,
    UnknownLimit,
)
from workers.policy.gcra import Rate

#: The scripts answer in microseconds (%.6f): a few roundings, never the machine's speed.
ROUNDING_S = 1e-5


@pytest.fixture
def limits(redis_client: redis.Redis) -> Limits:
    return Limits(redis_client)


@pytest.fixture
def other_worker(redis_url: str) -> Limits:
    """Another worker: its own client and connection pool, on the same Redis."""
    return Limits(redis.Redis.from_url(redis_url, decode_responses=True))


def server_now_s(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


class ServerSpan:
    """Redis server time (the clock every limit script reads) since the span began. A wait or
    TTL a script set to ``full`` in the span and counted down since is within
    ``[full - elapsed, full]``, however slow the machine."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.start_s = server_now_s(client)

    def elapsed_s(self) -> float:
        return server_now_s(self.client) - self.start_s

    def counted_down(self, value_s: float, full_s: float, rounding_s: float = ROUNDING_S) -> bool:
        return full_s - self.elapsed_s() - rounding_s <= value_s <= full_s + rounding_s


def wait_for_server_time(client: redis.Redis, moment_s: float, timeout_s: float = 60) -> None:
    """Return once Redis server time has passed ``moment_s`` (an epoch second)."""
    deadline = time.monotonic() + timeout_s
    while server_now_s(client) <= moment_s:
        assert time.monotonic() < deadline, f"server time never passed {moment_s}"
        time.sleep(0.01)


def all_at_once(call: Callable[[int], Any], n: int) -> list[Any]:
    """``call(0)`` ... ``call(n - 1)`` on n threads released together."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        results[i] = call(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


# --- configuration ---

def test_set_get_list_and_delete_configuration(limits: Limits, redis_client: redis.Redis) -> None:
    assert limits.set_limit("github-api", rate="60/h", burst=5) == LimitConfig(
        "github-api", Rate(60, 3600), 5, None
    )
    limits.set_limit("db.pool", concurrency=4)
    limits.set_limit("both_1", rate="10/s", concurrency=2)
    assert limits.get("github-api") == LimitConfig("github-api", Rate(60, 3600), 5, None)
    assert limits.get("nope") is None
    assert [c.name for c in limits.list_limits()] == ["both_1", "db.pool", "github-api"]
    assert limits.list_limits()[0] == LimitConfig("both_1", Rate(10, 1), 1, 2)
    # Configuration never expires.
    assert redis_client.ttl(LimitKeys.of("github-api").config) == -1
    assert redis_client.ttl(LIMITS_INDEX) == -1

    assert limits.delete_limit("db.pool") is True
    assert limits.delete_limit("db.pool") is False
    assert [c.name for c in limits.list_limits()] == ["both_1", "github-api"]


def test_set_replaces_the_whole_limit(limits: Limits) -> None:
    limits.set_limit("api", rate="60/m", burst=3)
    limits.set_limit("api", concurrency=2)
    assert limits.get("api") == LimitConfig("api", None, 1, 2)


def test_a_client_without_decoding_reads_the_same_configuration(redis_url: str) -> None:
    raw = Limits(redis.Redis.from_url(redis_url))
    raw.set_limit("api", rate="100/15m", burst=2, concurrency=3)
    assert raw.get("api") == LimitConfig("api", Rate(100, 900), 2, 3)
    assert raw.list_limits() == [LimitConfig("api", Rate(100, 900), 2, 3)]
    assert raw.try_acquire("api").allowed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "GitHub"}, "bad limit name 'GitHub'"),
        ({"name": "-x"}, "bad limit name '-x'"),
        ({"name": "a:b"}, "bad limit name 'a:b'"),
        ({"name": ""}, "bad limit name ''"),
        ({"name": "x"}, "needs a rate, a concurrency, or both"),
        ({"name": "x", "rate": "60/w"}, "bad rate '60/w'"),
        ({"name": "x", "concurrency": 2, "burst": 3}, "a burst needs a rate"),
        ({"name": "x", "rate": "1/s", "burst": 0}, "burst must be a whole number >= 1"),
        ({"name": "x", "concurrency": 0}, "concurrency must be a whole number >= 1"),
        ({"name": "x", "rate": 60}, "rate must be text like '60/h'"),
    ],
)
def test_bad_configuration_is_refused(
    limits: Limits, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        limits.set_limit(**kwargs)


def test_using_an_unknown_limit_says_so(limits: Limits) -> None:
    with pytest.raises(UnknownLimit, match="no limit named 'ghost'"):
        limits.try_acquire("ghost")
    with pytest.raises(UnknownLimit):
        limits.acquire_slot("ghost", "w1", 1)
    limits.set_limit("rate-only", rate="1/s")
    with pytest.raises(ValueError, match="has no concurrency slots"):
        limits.acquire_slot("rate-only", "w1", 1)


# --- rate (GCRA on server time) ---

def test_a_burst_passes_then_the_next_waits_one_interval(
    limits: Limits, other_worker: Limits, redis_client: redis.Redis
) -> None:
    limits.set_limit("api", rate="1/m", burst=3)  # one a minute
    span = ServerSpan(redis_client)
    assert [limits.try_acquire("api").allowed for _ in range(3)] == [True, True, True]
    for worker in (limits, other_worker):  # the state is shared, not per worker
        refused = worker.try_acquire("api")
        assert not refused.allowed
        assert span.counted_down(refused.wait_s, 60.0), refused


def test_the_state_is_the_gcra_tat_on_server_time_and_expires(
    limits: Limits, redis_client: redis.Redis
) -> None:
    limits.set_limit("api", rate="60/m", burst=3)
    span = ServerSpan(redis_client)
    before_s = span.start_s
    for _ in range(3):
        limits.try_acquire("api")
    keys = LimitKeys.of("api")
    tat_s = float(redis_client.get(keys.tat) or 0)
    assert before_s + 3.0 <= tat_s <= server_now_s(redis_client) + 3.0
    # It matters for 3 s (until tat passes) and lives a second longer (ms, ceiled).
    assert span.counted_down(redis_client.pttl(keys.tat) / 1000, 4.0, 0.002)


def test_concurrent_callers_never_get_more_than_the_burst(
    limits: Limits, other_worker: Limits
) -> None:
    limits.set_limit("api", rate="5/h", burst=5)
    workers = [limits, other_worker]
    assert sum(all_at_once(lambda i: workers[i % 2].try_acquire("api").allowed, 20)) == 5


def test_acquire_sleeps_through_a_short_wait_and_returns_a_long_one(
    limits: Limits, redis_client: redis.Redis
) -> None:
    limits.set_limit("api", rate="2/s")  # 0.5 s apart
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    span = ServerSpan(redis_client)
    assert limits.acquire("api", max_wait_s=1, sleep=sleep).allowed
    assert slept == []
    assert limits.acquire("api", max_wait_s=1, sleep=sleep).allowed
    assert len(slept) == 1 and span.counted_down(slept[0], 0.5)
    # Its turn is the next interval after the one slept to: 1 s after the first.
    refused = limits.acquire("api", max_wait_s=0.001, sleep=sleep)
    assert not refused.allowed and span.counted_down(refused.wait_s, 1.0)
    assert refused.wait_s <= 0.5 + ROUNDING_S  # at least the half second slept has passed
    assert len(slept) == 1


def test_cost_takes_several_at_once(limits: Limits, redis_client: redis.Redis) -> None:
    limits.set_limit("api", rate="1/m", burst=4)
    span = ServerSpan(redis_client)
    assert limits.try_acquire("api", cost=3).allowed
    refused = limits.try_acquire("api", cost=2)  # one left of the burst: a minute for the next
    assert not refused.allowed and span.counted_down(refused.wait_s, 60.0)
    with pytest.raises(ValueError, match="cost must be a whole number >= 1"):
        limits.try_acquire("api", cost=0)
    with pytest.raises(ValueError, match="cost 5 exceeds the burst 4 of limit 'api'"):
        limits.try_acquire("api", cost=5)


# --- push-back (a vendor's 429 with Retry-After) ---

def test_push_back_blocks_every_worker_and_a_shorter_one_does_not_shorten_it(
    limits: Limits, other_worker: Limits, redis_client: redis.Redis
) -> None:
    limits.set_limit("api", rate="10/s", burst=10)
    span = ServerSpan(redis_client)
    assert span.counted_down(limits.push_back("api", 30), 30.0)
    for worker in (limits, other_worker):
        refused = worker.try_acquire("api")
        assert not refused.allowed and span.counted_down(refused.wait_s, 30.0)
    # A later 429 with a shorter Retry-After (another worker saw it): still 30 s.
    assert span.counted_down(other_worker.push_back("api", 5), 30.0)
    assert span.counted_down(limits.try_acquire("api").wait_s, 30.0)
    # A longer one extends it.
    longer = ServerSpan(redis_client)
    assert longer.counted_down(other_worker.push_back("api", 60), 60.0)
    assert longer.counted_down(limits.try_acquire("api").wait_s, 60.0)
    pttl_s = redis_client.pttl(LimitKeys.of("api").backoff) / 1000
    assert longer.counted_down(pttl_s, 61.0, 0.002)  # a second past its end (ms, ceiled)


def test_push_back_ends_at_its_time_and_holds_a_limit_without_a_rate(
    limits: Limits, redis_client: redis.Redis
) -> None:
    limits.set_limit("pool", concurrency=2)
    assert limits.try_acquire("pool").allowed
    span = ServerSpan(redis_client)
    limits.push_back("pool", 1.0)
    refused = limits.try_acquire("pool")
    assert not refused.allowed and span.counted_down(refused.wait_s, 1.0)
    ends_at = redis_client.get(LimitKeys.of("pool").backoff)
    assert isinstance(ends_at, str)
    wait_for_server_time(redis_client, float(ends_at))
    assert limits.try_acquire("pool").allowed


def test_push_back_rejects_bad_durations(limits: Limits) -> None:
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="until_s_from_now must be seconds >= 0"):
            limits.push_back("api", bad)


# --- concurrency (leased slots) ---

def test_the_n_plus_first_slot_is_refused_until_one_is_released(
    limits: Limits, other_worker: Limits
) -> None:
    limits.set_limit("db", concurrency=2)
    assert limits.acquire_slot("db", "w1", 30)
    assert other_worker.acquire_slot("db", "w2", 30)
    assert not limits.acquire_slot("db", "w3", 30)
    # A redelivered holder keeps its one slot rather than taking another.
    assert limits.acquire_slot("db", "w1", 30)
    assert limits.release_slot("db", "w1") is True
    assert limits.release_slot("db", "w1") is False
    assert limits.acquire_slot("db", "w3", 30)


def test_concurrent_acquires_never_exceed_the_slots(limits: Limits, other_worker: Limits) -> None:
    limits.set_limit("db", concurrency=3)
    workers = [limits, other_worker]
    assert sum(all_at_once(lambda i: workers[i % 2].acquire_slot("db", f"h{i}", 30), 12)) == 3


def test_an_expired_lease_frees_its_slot(limits: Limits, redis_client: redis.Redis) -> None:
    limits.set_limit("db", concurrency=1)
    assert limits.acquire_slot("db", "killed-worker", 1.0)  # then SIGKILLed: never released
    assert not limits.acquire_slot("db", "w2", 30)
    expiry_s = redis_client.zscore(LimitKeys.of("db").slots, "killed-worker")
    assert expiry_s is not None
    wait_for_server_time(redis_client, expiry_s)
    assert limits.acquire_slot("db", "w2", 30)
    # The late holder lost its slot: it can neither renew nor release it.
    assert limits.renew_slot("db", "killed-worker", 30) is False
    assert limits.release_slot("db", "killed-worker") is False


def test_renew_extends_a_live_lease_and_the_set_expires_with_its_longest(
    limits: Limits, redis_client: redis.Redis
) -> None:
    limits.set_limit("db", concurrency=2)
    slots = LimitKeys.of("db").slots
    span = ServerSpan(redis_client)
    limits.acquire_slot("db", "w1", 5)
    limits.acquire_slot("db", "w2", 2)
    now_s = server_now_s(redis_client)
    expiry_s = redis_client.zscore(slots, "w1") or 0
    assert span.start_s + 5 - ROUNDING_S <= expiry_s <= now_s + 5 + ROUNDING_S
    # The set lives a second past its longest lease (ms, ceiled).
    assert span.counted_down(redis_client.pttl(slots) / 1000, 6.0, 0.002)
    renewed = ServerSpan(redis_client)
    assert limits.renew_slot("db", "w2", 20) is True
    now_s = server_now_s(redis_client)
    expiry_s = redis_client.zscore(slots, "w2") or 0
    assert renewed.start_s + 20 - ROUNDING_S <= expiry_s <= now_s + 20 + ROUNDING_S
    assert renewed.counted_down(redis_client.pttl(slots) / 1000, 21.0, 0.002)
    assert limits.renew_slot("db", "never-acquired", 20) is False
    with pytest.raises(ValueError, match="lease_s must be seconds > 0"):
        limits.acquire_slot("db", "w3", 0)
    with pytest.raises(ValueError, match="holder_id must be a non-empty string"):
        limits.acquire_slot("db", "", 1)


def test_slot_renews_while_the_body_runs_and_releases_on_exit(
    limits: Limits, other_worker: Limits, redis_client: redis.Redis
) -> None:
    limits.set_limit("db", concurrency=1)
    slots = LimitKeys.of("db").slots
    with limits.slot("db", "w1", lease_s=2.0) as lease:  # renewed every 2/3 s
        first_expiry_s = redis_client.zscore(slots, "w1")
        assert first_expiry_s is not None
        wait_for_server_time(redis_client, first_expiry_s)  # only the renewals keep it now
        assert not lease.lost
        assert (redis_client.zscore(slots, "w1") or 0) > server_now_s(redis_client)
        assert not other_worker.acquire_slot("db", "w2", 30)
        with pytest.raises(SlotUnavailable, match="every concurrency slot of limit 'db'"), \
                other_worker.slot("db", "w2", 30):
            pass
    assert redis_client.zcard(LimitKeys.of("db").slots) == 0
    assert other_worker.acquire_slot("db", "w2", 30)


def test_slot_releases_when_the_body_raises(limits: Limits, redis_client: redis.Redis) -> None:
    limits.set_limit("db", concurrency=1)
    with pytest.raises(RuntimeError, match="vendor down"), limits.slot("db", "w1", 30):
        raise RuntimeError("vendor down")
    assert redis_client.zcard(LimitKeys.of("db").slots) == 0
    assert limits.acquire_slot("db", "w2", 30)


# --- keys ---

def test_every_state_key_expires_and_delete_removes_config_and_state(
    limits: Limits, redis_client: redis.Redis
) -> None:
    limits.set_limit("api", rate="60/m", burst=2, concurrency=2)
    limits.try_acquire("api")
    limits.push_back("api", 10)
    limits.acquire_slot("api", "w1", 30)
    keys = LimitKeys.of("api")
    state = [keys.tat, keys.backoff, keys.slots]
    assert sorted(redis_client.keys("fanout:*")) == sorted([LIMITS_INDEX, keys.config, *state])
    assert all(redis_client.pttl(key) > 0 for key in state)

    assert limits.delete_limit("api") is True
    assert redis_client.keys("fanout:*") == []


def test_callers_willing_to_wait_reserve_turns_spaced_at_the_rate(
    limits: Limits, redis_client: redis.Redis
) -> None:
    limits.set_limit("api", rate="1/m")  # a minute apart
    span = ServerSpan(redis_client)
    permits = [limits.try_acquire("api", max_wait_s=150) for _ in range(4)]
    assert [p.allowed for p in permits] == [True, True, True, False]
    waits = [p.wait_s for p in permits]
    assert waits[0] == 0
    assert span.counted_down(waits[1], 60.0) and span.counted_down(waits[2], 120.0)
    # Refused: its turn is past the 150 s it allows.
    assert span.counted_down(waits[3], 180.0)


def test_a_turn_reserved_before_a_push_back_still_waits_for_it(
    limits: Limits, redis_client: redis.Redis
) -> None:
    limits.set_limit("api", rate="2/s")  # 0.5 s apart
    assert limits.try_acquire("api").allowed
    slept: list[float] = []
    spans: list[ServerSpan] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 1:  # a vendor's 429 arrives while this turn sleeps
            spans.append(ServerSpan(redis_client))
            limits.push_back("api", 1.5)
        time.sleep(seconds)

    assert limits.acquire("api", max_wait_s=2, sleep=sleep).allowed
    assert len(slept) == 2 and spans[0].counted_down(slept[1], 1.5)
    assert slept[1] <= 1.5 - slept[0] + ROUNDING_S  # the first sleep was part of the push-back
    refused = Limits(limits.redis)
    refused.push_back("api", 5)
    assert not limits.acquire("api", max_wait_s=1, sleep=lambda s: None).allowed
