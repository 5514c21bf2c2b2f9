"""Limits used per key (#21 item 2): a limit set the usual way is the template, each key of it
(an account, a token's id) gets its own rate, push-back and slots, created on first use and
expiring when idle. On a real Redis; the end-to-end test with real workers against a vendor
limiting per token is at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from conftest import VendorHandle, WorkerFactory, wait_for
from test_harvest import END_DAY

from demo_vendor.data import account_id, account_token
from producers.trigger import start_run
from workers import per_key
from workers.engine.services import services
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


def test_three_tokens_each_held_to_its_own_limit_and_a_429_slows_only_its_token(
    vendor: VendorHandle, start_worker: WorkerFactory, redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The issue's case: 3 accounts with 3 tokens, the vendor enforcing 10/s per token, every
    call through ("vendor-token", its token) with the template 10/s burst 1 (the bench
    pipeline ``benchkeys``). Each token stays within 10 in any second while the three run
    side by side, and a 429 with Retry-After on one token holds that token only."""
    root = str(Path(__file__).resolve().parents[1])  # benchmarks/ is not an installed package
    pipelines = {"FANOUT_PIPELINES": "benchmarks.ratelimit_pipeline",
                 "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    monkeypatch.setenv("FANOUT_PIPELINES", pipelines["FANOUT_PIPELINES"])
    monkeypatch.syspath_prepend(root)
    vendor.configure(accounts=3, services=5, account_tokens=True, key_rate_limit_rps=10)
    Limits(redis_client).set_limit("vendor-token", rate="10/s", burst=1)
    for _ in range(3):
        start_worker(pipelines, concurrency=4)
    run_id = start_run("benchkeys", {"days": 12, "end_day": END_DAY, "vendor_url": vendor.url,
                                     "http_retries": 0})
    held = account_token(account_id(1))
    wait_for(lambda: vendor.stats()["by_key"].get(held, {}).get("requests", 0) >= 10,
             what="the harvest under way")
    vendor.configure(burst_429={"count": 1, "retry_after_s": 3, "key": held})
    status = services().ledger.view.wait(run_id, 120)
    snap = services().ledger.view.snapshot(run_id, ["accounts", "metric_day"])
    assert status is not None and snap is not None
    summary = snap.summary()

    assert summary["status"] == "succeeded"
    assert summary["rows_written"] == 3 * 5 * 12
    stats = vendor.stats()
    by_key = {k: v for k, v in stats["by_key"].items() if k != "-"}
    assert sorted(by_key) == [account_token(account_id(n)) for n in (1, 2, 3)]
    assert all(s["max_rps_1s"] <= 10 for s in by_key.values()), by_key
    assert stats["max_rps_1s"] > 10  # the tokens' calls went side by side
    assert by_key[held]["sent_429"] >= 1
    assert stats["sent_429"] - 1 <= 2  # the one injected, and at most 2 of fanout's own
    # The seconds fully inside the held token's Retry-After: it sent nothing, the others did.
    [refused_at] = [row[0] for row in by_key[held]["per_second"] if row[2]][:1]
    inside = {refused_at + 1, refused_at + 2}

    def sent_inside(token: str) -> int:
        return sum(row[1] for row in by_key[token]["per_second"] if row[0] in inside)

    assert sent_inside(held) == 0
    assert all(sent_inside(t) > 0 for t in by_key if t != held), by_key
