"""Limits used per key (#21 item 2): a limit set the usual way is the template, each key of it
(an account, a token's id) gets its own rate, push-back and slots, created on first use and
expiring when idle. On a real Redis; the end-to-end test with real workers against a vendor
limiting per token is at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import redis

from workers import per_key
from workers.keys import LimitKeys
from workers.limits import KEY_IDLE_S, MAX_KEY_CHARS, Limits, check_key, resolve


@pytest.fixture
def limits(redis_client: redis.Redis) -> Limits:
    return Limits(redis_client)


def test_each_key_has_its_own_rate_push_back_and_slots(limits: Limits) -> None:
    limits.set_limit("vendor-token", rate="1/m", burst=1, concurrency=1)
    a, b = ("vendor-token", "acct-a"), ("vendor-token", 7)

    assert limits.try_acquire(a).allowed
    refused = limits.try_acquire(a)
    assert not refused.allowed and 59 < refused.wait_s <= 60
    assert limits.try_acquire(b).allowed  # b's rate is its own
    assert limits.try_acquire("vendor-token").allowed  # and so is the template's own use

    limits.push_back(a, 30)
    assert 29 < limits.pushed_back_s(a) <= 30
    assert limits.pushed_back_s(b) == 0.0

    assert limits.acquire_slot(a, "h1", 10)
    assert not limits.acquire_slot(a, "h2", 10)
    assert limits.acquire_slot(b, "h2", 10)  # one slot per key
    assert limits.status(a)["in_use"] == 1 and limits.status(a)["wait_s"] >= 29
    assert limits.keys_in_use("vendor-token") == ["7", "acct-a"]


def test_keys_expire_when_idle_and_go_with_their_limit(
    limits: Limits, redis_client: redis.Redis
) -> None:
    limits.set_limit("vendor-token", rate="10/s")
    key = ("vendor-token", "acct-a")
    limits.try_acquire(key)
    keys = LimitKeys.of("vendor-token", "acct-a")
    # The key's rate state expires a second after its turn; the index entry when idle.
    assert 0 < redis_client.pttl(keys.tat) <= 1100
    seconds, micros = redis_client.time()
    [(member, idle_at)] = redis_client.zrange(keys.keys, 0, -1, withscores=True)
    assert member == "acct-a"
    assert 0 < idle_at - (seconds + micros / 1e6) <= KEY_IDLE_S
    assert 0 < redis_client.pttl(keys.keys) <= KEY_IDLE_S * 1000 + 1000
    # An entry gone idle is not listed (and is dropped at the next use of any key).
    redis_client.zadd(keys.keys, {"old": 1.0})
    assert limits.keys_in_use("vendor-token") == ["acct-a"]
    limits.try_acquire(("vendor-token", "acct-b"))
    assert redis_client.zscore(keys.keys, "old") is None

    limits.push_back(key, 5)
    assert limits.delete_limit("vendor-token")
    assert redis_client.keys("fanout:limit:*") == []


@pytest.mark.parametrize(("key", "message"), [
    ("", "limit 'vendor-token': a key must not be empty"),
    (None, "limit 'vendor-token': a key must be text or a whole number, got None"),
    (True, "limit 'vendor-token': a key must be text or a whole number, got True"),
    (1.5, "limit 'vendor-token': a key must be text or a whole number, got 1.5"),
    ("x" * (MAX_KEY_CHARS + 1),
     f"limit 'vendor-token': a key must be at most {MAX_KEY_CHARS} characters, got 201"),
])
def test_a_bad_key_is_one_clear_error(limits: Limits, key: object, message: str) -> None:
    limits.set_limit("vendor-token", rate="10/s")
    with pytest.raises(ValueError) as raised:
        limits.try_acquire(("vendor-token", key))  # type: ignore[arg-type]
    assert str(raised.value) == message
    with pytest.raises(ValueError, match="a key must"):
        per_key("vendor-token", lambda item: item).ref(key)


def test_references_and_per_key() -> None:
    assert resolve("github-api") == ("github-api", None)
    assert resolve(("github-api", 42)) == ("github-api", "42")
    assert check_key("x", "tok-1") == "tok-1"
    with pytest.raises(ValueError, match=r"a limit is a name or \(name, key\)"):
        resolve(("a", "b", "c"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bad limit name 'Bad Name'"):
        per_key("Bad Name", lambda item: item)
    by_account = per_key("vendor-account", lambda item: item["account"])
    assert by_account.ref({"account": "a1"}) == ("vendor-account", "a1")


def test_limits_list_shows_the_keys_in_use(redis_url: str, limits: Limits) -> None:
    limits.set_limit("vendor-token", rate="1/m", concurrency=2)
    limits.try_acquire(("vendor-token", "acct-a"))
    limits.acquire_slot(("vendor-token", "acct-b"), "h1", 30)
    listed = subprocess.run([sys.executable, "-m", "producers.cli", "limits", "list", "--json"],
                            capture_output=True, text=True, timeout=60, env=os.environ.copy())
    [row] = json.loads(listed.stdout)
    assert row["name"] == "vendor-token" and row["in_use"] == 0 and row["wait_s"] == 0.0
    [key_a, key_b] = row["keys"]
    assert key_a["key"] == "acct-a" and key_a["in_use"] == 0 and 0 < key_a["wait_s"] <= 60
    assert key_b == {"key": "acct-b", "in_use": 1, "wait_s": 0.0}
    text = subprocess.run([sys.executable, "-m", "producers.cli", "limits", "list"],
                          capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert "key acct-a" in text.stdout and "key acct-b" in text.stdout
