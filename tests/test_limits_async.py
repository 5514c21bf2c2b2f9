"""Global rate limits on async stages (#20): calls waiting for their turn on an event loop must
reach the vendor at the limit's spacing, not bunched. The demo's stages are ``async def``, each
worker keeps a claimed batch of 64 calls in flight, and fanout's limit equals the vendor's own:
any call that wakes late and lands next to an on-time one makes the vendor count more than
its limit in a second and answer 429."""

from __future__ import annotations

import pytest
import redis
from conftest import VendorHandle, WorkerFactory
from test_harvest import finish, run_demo

from workers import scripts
from workers.keys import LimitKeys
from workers.limits import Limits
from workers.pipelines.demo import VENDOR_LIMIT


def test_an_async_stage_at_the_vendors_own_rate_gets_no_429(
    vendor: VendorHandle, start_worker: WorkerFactory, redis_client: redis.Redis
) -> None:
    rate = 100
    vendor.configure(accounts=3, services=10, rate_limit_rps=rate)
    Limits(redis_client).set_limit(VENDOR_LIMIT, rate=f"{rate}/s", burst=1)
    for _ in range(3):
        start_worker(concurrency=4)
    summary = finish(run_demo(vendor, days=20), timeout_s=120)

    assert summary["status"] == "succeeded"
    assert summary["rows_written"] == 600
    stats = vendor.stats()
    brief = {k: stats[k] for k in ("sent_429", "max_rps_1s", "total")}
    # On the code before the fix this run saw 429s (calls woke late from the executor and
    # landed next to on-time ones). Now: none, and the busiest second is within the limit.
    assert stats["sent_429"] == 0, brief
    assert stats["max_rps_1s"] <= rate, brief
    assert stats["total"] == 1 + 3 + 600, brief


def test_the_send_check_spaces_calls_by_the_gap_and_holds_them_while_pushed_back(
    redis_client: redis.Redis,
) -> None:
    """``lua/limit_send.lua``: the first call goes; one asking within the gap learns how long
    until the gap has passed since the first (server time: the wait plus the server time that
    passed between the two answers is the gap, to the script's microseconds); a push-back holds
    every call, with the seconds until it ends."""
    limits = Limits(redis_client)
    limits.set_limit("send-test", rate="1/s")
    keys = LimitKeys.of("send-test")
    send = scripts.load("limit_send")
    gap_s = 10.0  # seconds: no machine is that slow between two calls

    go, first_at = send(redis_client, keys, [gap_s])[:2]
    assert int(go) == 1
    held = send(redis_client, keys, [gap_s])
    seconds, micros = redis_client.time()
    assert [int(held[0]), int(held[2])] == [0, 0]
    # The wait counts from the first call's pass: gap less the time since, never more.
    assert float(held[1]) <= gap_s
    assert float(held[1]) >= gap_s - (seconds + micros / 1e6 - float(first_at)) - 1e-5
    assert int(send(redis_client, keys, [0])[0]) == 1  # no gap (a burst > 1): only push-backs

    limits.push_back("send-test", 30)
    pushed = send(redis_client, keys, [0])
    assert [int(pushed[0]), int(pushed[2])] == [0, 1]
    assert 29 < float(pushed[1]) <= 30


def test_a_pass_given_back_lets_the_next_call_go_as_if_it_had_not_been(
    redis_client: redis.Redis,
) -> None:
    """``lua/limit_unsend.lua``: a pass whose answer came too late to use is given back (the
    mark it replaced is put back), so the next call passes at once instead of a whole gap
    later; a pass that is no longer the last is left alone."""
    Limits(redis_client).set_limit("unsend-test", rate="1/s")
    keys = LimitKeys.of("unsend-test")
    send, unsend = scripts.load("limit_send"), scripts.load("limit_unsend")
    gap_s = 10.0

    first = send(redis_client, keys, [gap_s])
    assert int(first[0]) == 1 and first[2] in ("", b"")  # nothing passed before it
    assert int(unsend(redis_client, keys, [first[3], first[2], 60_000])) == 1
    assert redis_client.get(keys.sent) is None  # as if it had not passed
    second = send(redis_client, keys, [gap_s])
    assert int(second[0]) == 1  # at once, not 10 s later
    third = send(redis_client, keys, [gap_s])
    assert int(third[0]) == 0  # the second's pass stands: the gap holds the third
    # A stale give-back (of the first pass, long replaced) changes nothing.
    assert int(unsend(redis_client, keys, [first[3], first[2], 60_000])) == 0
    assert int(send(redis_client, keys, [gap_s])[0]) == 0

    # Giving back a pass that replaced a mark puts that mark back, with its gap still on.
    replaced = redis_client.get(keys.sent)
    redis_client.set(keys.sent, f"{float(replaced) - gap_s:.6f}")  # the gap has passed
    fourth = send(redis_client, keys, [gap_s])
    assert int(fourth[0]) == 1 and float(fourth[2]) == float(replaced) - gap_s
    assert int(unsend(redis_client, keys, [fourth[3], fourth[2], 60_000])) == 1
    assert float(redis_client.get(keys.sent)) == float(replaced) - gap_s


def test_a_call_within_reach_of_the_gap_reserves_its_moment(redis_client: redis.Redis) -> None:
    """With a reservation window (ARGV 4), a call that finds the gap not yet over by at most
    the window is told to go when it ends, and that moment becomes the last pass: the next
    call reserves one gap after it, not after the time it asked. Beyond the window it is held
    as before (it asks again after the wait)."""
    Limits(redis_client).set_limit("reserve-test", rate="1/s")
    keys = LimitKeys.of("reserve-test")
    send = scripts.load("limit_send")
    gap_s = 2.0

    first = send(redis_client, keys, [gap_s, "", "", 5.0])
    assert int(first[0]) == 1 and float(first[4]) == 0.0  # at once
    second = send(redis_client, keys, [gap_s, "", "", 5.0])
    assert int(second[0]) == 1
    # Its moment: one gap after the first.
    assert float(second[3]) == pytest.approx(float(first[3]) + gap_s, abs=2e-6)
    assert 0 < float(second[4]) <= gap_s
    third = send(redis_client, keys, [gap_s, "", "", 5.0])
    assert float(third[3]) == pytest.approx(float(first[3]) + 2 * gap_s, abs=2e-6)
    held = send(redis_client, keys, [gap_s, "", "", 1.0])  # 6 s off: beyond a 1 s window
    assert [int(held[0]), int(held[2])] == [0, 0] and float(held[1]) > 5.0
