"""Contract of the global limits (``workers/limits.py``, ``lua/limit_*.lua``) on a real Redis.

Waits are compared with the interval within a tolerance; the few sleeps (a lease running out,
a push-back ending) add up to under a second for the file.
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

TOLERANCE_S = 0.05


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

def test_a_burst_passes_then_the_next_waits_about_one_interval(
    limits: Limits, other_worker: Limits
) -> None:
    limits.set_limit("api", rate="60/m", burst=3)  # one per second
    assert [limits.try_acquire("api").allowed for _ in range(3)] == [True, True, True]
    for worker in (limits, other_worker):  # the state is shared, not per worker
        refused = worker.try_acquire("api")
        assert not refused.allowed
        assert 1.0 - TOLERANCE_S < refused.wait_s <= 1.0


def test_the_state_is_the_gcra_tat_on_server_time_and_expires(
    limits: Limits, redis_client: redis.Redis
) -> None:
    limits.set_limit("api", rate="60/m", burst=3)
    before_s = server_now_s(redis_client)
    for _ in range(3):
        limits.try_acquire("api")
    keys = LimitKeys.of("api")
    tat_s = float(redis_client.get(keys.tat) or 0)
    assert before_s + 3.0 <= tat_s <= server_now_s(redis_client) + 3.0
    # It matters for 3 s (until tat passes) and lives about a second longer.
    assert 3000 < redis_client.pttl(keys.tat) <= 4000


def test_concurrent_callers_never_get_more_than_the_burst(
    limits: Limits, other_worker: Limits
) -> None:
    limits.set_limit("api", rate="5/h", burst=5)
    workers = [limits, other_worker]
    assert sum(all_at_once(lambda i: workers[i % 2].try_acquire("api").allowed, 20)) == 5


def test_acquire_sleeps_through_a_short_wait_and_returns_a_long_one(limits: Limits) -> None:
    limits.set_limit("api", rate="20/s")  # 0.05 s apart
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    assert limits.acquire("api", max_wait_s=1, sleep=sleep).allowed
    assert slept == []
    assert limits.acquire("api", max_wait_s=1, sleep=sleep).allowed
    assert len(slept) == 1 and slept[0] <= 0.05
    refused = limits.acquire("api", max_wait_s=0.001, sleep=sleep)
    assert not refused.allowed and 0.05 - TOLERANCE_S < refused.wait_s <= 0.05
    assert len(slept) == 1


def test_cost_takes_several_at_once(limits: Limits) -> None:
    limits.set_limit("api", rate="60/m", burst=4)
    assert limits.try_acquire("api", cost=3).allowed
    refused = limits.try_acquire("api", cost=2)
    assert not refused.allowed and 1.0 - TOLERANCE_S < refused.wait_s <= 1.0
    with pytest.raises(ValueError, match="cost must be a whole number >= 1"):
        limits.try_acquire("api", cost=0)
    with pytest.raises(ValueError, match="cost 5 exceeds the burst 4 of limit 'api'"):
        limits.try_acquire("api", cost=5)


# --- push-back (a vendor's 429 with Retry-After) ---

def test_push_back_blocks_every_worker_and_a_shorter_one_does_not_shorten_it(
    limits: Limits, other_worker: Limits, redis_client: redis.Redis
) -> None:
    limits.set_limit("api", rate="10/s", burst=10)
    assert 30 - TOLERANCE_S < limits.push_back("api", 30) <= 30
    for worker in (limits, other_worker):
        refused = worker.try_acquire("api")
        assert not refused.allowed and 30 - TOLERANCE_S < refused.wait_s <= 30
    # A later 429 with a shorter Retry-After (another worker saw it): still 30 s.
    assert 30 - TOLERANCE_S < other_worker.push_back("api", 5) <= 30
    assert 30 - TOLERANCE_S < limits.try_acquire("api").wait_s <= 30
    # A longer one extends it.
    assert 60 - TOLERANCE_S < other_worker.push_back("api", 60) <= 60
    assert 60 - TOLERANCE_S < limits.try_acquire("api").wait_s <= 60
    assert 60_000 < redis_client.pttl(LimitKeys.of("api").backoff) <= 61_000


def test_push_back_ends_at_its_time_and_holds_a_limit_without_a_rate(limits: Limits) -> None:
    limits.set_limit("pool", concurrency=2)
    assert limits.try_acquire("pool").allowed
    limits.push_back("pool", 0.15)
    refused = limits.try_acquire("pool")
    assert not refused.allowed and 0.15 - TOLERANCE_S < refused.wait_s <= 0.15
    time.sleep(0.2)
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


def test_an_expired_lease_frees_its_slot(limits: Limits) -> None:
    limits.set_limit("db", concurrency=1)
    assert limits.acquire_slot("db", "killed-worker", 0.2)  # then SIGKILLed: never released
    assert not limits.acquire_slot("db", "w2", 30)
    time.sleep(0.25)
    assert limits.acquire_slot("db", "w2", 30)
    # The late holder lost its slot: it can neither renew nor release it.
    assert limits.renew_slot("db", "killed-worker", 30) is False
    assert limits.release_slot("db", "killed-worker") is False


def test_renew_extends_a_live_lease_and_the_set_expires_with_its_longest(
    limits: Limits, redis_client: redis.Redis
) -> None:
    limits.set_limit("db", concurrency=2)
    slots = LimitKeys.of("db").slots
    limits.acquire_slot("db", "w1", 5)
    limits.acquire_slot("db", "w2", 2)
    now_s = server_now_s(redis_client)
    assert now_s + 4.9 < (redis_client.zscore(slots, "w1") or 0) <= now_s + 5
    assert 5000 < redis_client.pttl(slots) <= 6000
    assert limits.renew_slot("db", "w2", 20) is True
    assert now_s + 19.9 < (redis_client.zscore(slots, "w2") or 0) <= now_s + 20.1
    assert 20_000 < redis_client.pttl(slots) <= 21_000
    assert limits.renew_slot("db", "never-acquired", 20) is False
    with pytest.raises(ValueError, match="lease_s must be seconds > 0"):
        limits.acquire_slot("db", "w3", 0)
    with pytest.raises(ValueError, match="holder_id must be a non-empty string"):
        limits.acquire_slot("db", "", 1)


def test_slot_renews_while_the_body_runs_and_releases_on_exit(
    limits: Limits, other_worker: Limits, redis_client: redis.Redis
) -> None:
    limits.set_limit("db", concurrency=1)
    with limits.slot("db", "w1", lease_s=0.15) as lease:
        time.sleep(0.3)  # twice the lease: only the renewals keep it
        assert not lease.lost
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


def test_callers_willing_to_wait_reserve_turns_spaced_at_the_rate(limits: Limits) -> None:
    limits.set_limit("api", rate="10/s")  # 0.1 s apart
    permits = [limits.try_acquire("api", max_wait_s=0.25) for _ in range(4)]
    assert [p.allowed for p in permits] == [True, True, True, False]
    waits = [p.wait_s for p in permits]
    assert waits[0] == 0
    assert 0.1 - TOLERANCE_S < waits[1] <= 0.1 and 0.2 - TOLERANCE_S < waits[2] <= 0.2
    assert 0.3 - TOLERANCE_S < waits[3] <= 0.3  # refused: its turn is past the 0.25 s it allows


def test_a_turn_reserved_before_a_push_back_still_waits_for_it(limits: Limits) -> None:
    limits.set_limit("api", rate="20/s")  # 0.05 s apart
    assert limits.try_acquire("api").allowed
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 1:  # a vendor's 429 arrives while this turn sleeps
            limits.push_back("api", 0.3)
        time.sleep(seconds)

    assert limits.acquire("api", max_wait_s=1, sleep=sleep).allowed
    assert len(slept) == 2 and 0.3 - 0.06 < slept[1] <= 0.3
    refused = Limits(limits.redis)
    refused.push_back("api", 5)
    assert not limits.acquire("api", max_wait_s=1, sleep=lambda s: None).allowed
