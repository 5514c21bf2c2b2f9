"""Contract of the ledger's Lua scripts (``workers/lua/*.lua``) on a real Redis.

One group of tests per script: ``create_run``, ``register_items``, ``finish_item``,
``advance_loop``, the ways a run ends (``_end_run``: every run key refreshed), and the
transport's ``claim`` / ``restore_claimed``. Everything goes through
``Ledger``'s parts (or ``RedisTransport``) and is checked with exact numbers from
``ledger.view.snapshot`` and direct reads of the keys in ``keys.RunKeys``. Nothing sleeps; one
``ledger.view.wait`` on an unfinished run blocks for its 0.05 s timeout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from importlib import resources
from types import SimpleNamespace
from typing import Any, cast

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from workers import keys, scripts
from workers.embedded_redis import free_port
from workers.engine.scheduler import Scheduler
from workers.ids import canonical_json
from workers.keys import RunKeys
from workers.ledger import COUNTERS, Finish, Ledger, LedgerError, MapSignal
from workers.ledger import runs as runs_module
from workers.liveness import worker_id
from workers.message import Delivery, decode_redis
from workers.outcome import Outcome
from workers.transport import RedisTransport

TTL_S = 600
RUN = "run-1"
ROOT = "accounts"
CHILD = "services"


@pytest.fixture
def ledger(redis_client: redis.Redis) -> Ledger:
    return Ledger(redis_client, ttl_s=TTL_S)


@pytest.fixture
def transport(redis_client: redis.Redis) -> RedisTransport:
    return RedisTransport(redis_client, ttl_s=TTL_S)


def roots(*names: str) -> list[tuple[str, Any]]:
    return [(f"{ROOT}:{n}", {"account": n}) for n in names]


def children(*names: str) -> list[tuple[str, Any]]:
    return [(f"{CHILD}:{n}", {"service": n}) for n in names]


def counters(**nonzero: int) -> dict[str, int]:
    """One stage's counters as ``snapshot`` shows them: every counter, zero unless given."""
    return {**dict.fromkeys(COUNTERS, 0), **nonzero}


RUN_KEY_NAMES = tuple(f.name for f in dataclasses.fields(RunKeys))


def run_keys_now(client: redis.Redis, run_id: str) -> dict[str, str]:
    """The run's keys that exist, by their RunKeys name."""
    rk = RunKeys.of(run_id)
    return {n: getattr(rk, n) for n in RUN_KEY_NAMES if client.exists(getattr(rk, n))}


def finish(run_id: str, item: str, outcome: Outcome = Outcome.SUCCEEDED, **kw: Any) -> Finish:
    return Finish(run_id, item.split(":", 1)[0], item, outcome, **kw)


# -- create_run ---------------------------------------------------------------------------


def test_create_run_registers_roots_pending_and_counts_enqueued(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    assert ledger.runs.create(RUN, "demo", {"days": 2}, ROOT, roots("a", "b", "c")) is True

    snap = ledger.view.snapshot(RUN)
    assert snap is not None
    assert (snap.pipeline, snap.status, snap.params) == ("demo", "running", {"days": 2})
    assert (snap.pending, snap.rows_written, snap.failed_items) == (3, 0, 0)
    assert snap.finished_at is None
    assert snap.stages == {ROOT: counters(enqueued=3)}
    rk = RunKeys.of(RUN)
    assert redis_client.hgetall(rk.items) == {"accounts:a": "p", "accounts:b": "p",
                                              "accounts:c": "p"}
    assert redis_client.hgetall(rk.payloads) == {
        f"accounts:{n}": canonical_json({"account": n}) for n in "abc"
    }
    assert ledger.items.pending_payloads(RUN) == {f"accounts:{n}": {"account": n} for n in "abc"}
    assert redis_client.lrange(rk.roots, 0, -1) == ["accounts:a", "accounts:b", "accounts:c"]
    assert redis_client.llen(rk.done) == 0
    run = redis_client.hgetall(rk.run)
    assert run["run_id"] == RUN
    assert run["progress_at"] == run["created_at"]


def test_creating_the_same_run_again_returns_false_and_changes_nothing(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    assert ledger.runs.create(RUN, "demo", {"days": 2}, ROOT, roots("a", "b")) is True
    ledger.items.finish(finish(RUN, "accounts:a"))
    rk = RunKeys.of(RUN)

    def state() -> tuple[Any, ...]:
        return (redis_client.hgetall(rk.run), redis_client.hgetall(rk.counts),
                redis_client.hgetall(rk.items), redis_client.hgetall(rk.payloads),
                redis_client.lrange(rk.roots, 0, -1))

    before = state()
    again = ledger.runs.create(RUN, "other", {"days": 9}, ROOT, roots("a", "b", "x", "y"))
    assert again is False
    assert state() == before
    snap = ledger.view.snapshot(RUN)
    assert snap is not None
    assert (snap.pipeline, snap.params, snap.pending) == ("demo", {"days": 2}, 1)
    assert snap.stages == {ROOT: counters(enqueued=2, succeeded=1)}


def test_creating_the_same_run_again_keeps_its_created_time_in_the_runs_index(
    ledger: Ledger, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = SimpleNamespace(now=1_700_000_000.0)
    fake_time = SimpleNamespace(time=lambda: clock.now, monotonic=time.monotonic)
    monkeypatch.setattr(runs_module, "time", fake_time)
    assert ledger.runs.create(RUN, "demo", {}, ROOT, roots("a")) is True
    clock.now += 50
    assert ledger.runs.create("run-2", "demo", {}, ROOT, roots("a")) is True
    clock.now += 50
    assert ledger.runs.create(RUN, "demo", {}, ROOT, roots("a")) is False

    assert redis_client.zscore(keys.RUNS_INDEX, RUN) == 1_700_000_000.0
    assert ledger.view.latest_run() == "run-2"


def test_duplicate_root_ids_are_counted_once(ledger: Ledger, redis_client: redis.Redis) -> None:
    given = [("accounts:a", {"n": 1}), ("accounts:b", {"n": 2}), ("accounts:a", {"n": 3})]
    assert ledger.runs.create(RUN, "demo", {}, ROOT, given) is True

    snap = ledger.view.snapshot(RUN)
    assert snap is not None
    assert snap.pending == 2
    assert snap.stages == {ROOT: counters(enqueued=2)}
    rk = RunKeys.of(RUN)
    assert redis_client.hgetall(rk.items) == {"accounts:a": "p", "accounts:b": "p"}
    # The first payload given for the id is the one kept.
    assert ledger.items.pending_payloads(RUN) == {"accounts:a": {"n": 1}, "accounts:b": {"n": 2}}
    # Two finishes end the run: the duplicate did not leave a third pending item.
    assert ledger.items.finish(finish(RUN, "accounts:a")) == 1
    assert ledger.items.finish(finish(RUN, "accounts:b")) == 2


def test_a_run_with_no_roots_is_born_succeeded(ledger: Ledger, redis_client: redis.Redis) -> None:
    assert ledger.runs.create(RUN, "demo", {}, ROOT, []) is True

    snap = ledger.view.snapshot(RUN)
    assert snap is not None
    assert (snap.status, snap.pending, snap.finished) == ("succeeded", 0, True)
    assert snap.finished_at == snap.created_at
    assert snap.stages == {ROOT: counters()}
    rk = RunKeys.of(RUN)
    assert redis_client.lrange(rk.done, 0, -1) == ["succeeded"]
    assert set(run_keys_now(redis_client, RUN)) == {"run", "counts", "done"}
    for name, key in run_keys_now(redis_client, RUN).items():
        assert 0 < redis_client.ttl(key) <= TTL_S, name
    assert ledger.view.wait(RUN, timeout_s=0.1) == "succeeded"
    assert redis_client.lrange(rk.done, 0, -1) == ["succeeded"]  # put back for other waiters


def test_every_run_key_has_a_ttl_and_the_run_is_indexed(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    assert ledger.runs.create(RUN, "demo", {}, ROOT, roots("a", "b")) is True

    existing = run_keys_now(redis_client, RUN)
    assert set(existing) == {"run", "counts", "items", "payloads", "roots"}
    for name, key in existing.items():
        assert TTL_S - 5 <= redis_client.ttl(key) <= TTL_S, name
    created_at = float(str(redis_client.hget(RunKeys.of(RUN).run, "created_at")))
    assert redis_client.zrange(keys.RUNS_INDEX, 0, -1, withscores=True) == [(RUN, created_at)]
    assert ledger.view.latest_run() == RUN


# -- register_items -----------------------------------------------------------------------


def test_registering_the_same_children_twice_counts_them_once(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    ledger.runs.create(RUN, "demo", {}, ROOT, roots("a"))

    assert ledger.items.register(RUN, CHILD, children("x", "y", "z")) == 3
    assert ledger.items.register(RUN, CHILD, children("x", "y", "z")) == 0
    assert ledger.items.register(RUN, CHILD, children("y", "w")) == 1

    snap = ledger.view.snapshot(RUN)
    assert snap is not None
    assert snap.pending == 5
    assert snap.stages == {ROOT: counters(enqueued=1), CHILD: counters(enqueued=4)}
    items = redis_client.hgetall(RunKeys.of(RUN).items)
    assert items == {"accounts:a": "p", **{f"services:{n}": "p" for n in "xyzw"}}
    assert ledger.items.pending_payloads(RUN) == {
        "accounts:a": {"account": "a"}, **{f"services:{n}": {"service": n} for n in "xyzw"}
    }
    for name, key in run_keys_now(redis_client, RUN).items():
        assert 0 < redis_client.ttl(key) <= TTL_S, name


def test_a_fan_out_published_once_is_not_registered_or_published_again(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    """A parent run again after its worker died makes the same fan-out (same digest): once
    the first was published, register answers None and changes nothing, so the runner
    publishes no second copy of children that may still wait on their queue."""
    ledger.runs.create(RUN, "demo", {}, ROOT, roots("a"))
    assert ledger.items.register(RUN, CHILD, children("x", "y"), fan_out="d1") == 2
    # Not yet published (the worker died between the two steps): registered again, 0 new.
    assert ledger.items.register(RUN, CHILD, children("x", "y"), fan_out="d1") == 0
    ledger.items.published(RUN, "d1")

    before = (redis_client.hgetall(RunKeys.of(RUN).run),
              redis_client.hgetall(RunKeys.of(RUN).counts))
    assert ledger.items.register(RUN, CHILD, children("x", "y"), fan_out="d1") is None
    assert (redis_client.hgetall(RunKeys.of(RUN).run),
            redis_client.hgetall(RunKeys.of(RUN).counts)) == before
    # Another fan-out of the same parent (a second ctx.map) is its own.
    assert ledger.items.register(RUN, CHILD, children("y", "z"), fan_out="d2") == 1
    snap = ledger.view.snapshot(RUN)
    assert snap is not None
    assert (snap.pending, snap.stages[CHILD]) == (4, counters(enqueued=3))
    fanned = RunKeys.of(RUN).fanned
    assert redis_client.smembers(fanned) == {"d1"}
    assert 0 < redis_client.ttl(fanned) <= TTL_S


def test_registering_a_child_that_already_ended_does_not_revive_it(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    ledger.runs.create(RUN, "demo", {}, ROOT, roots("a"))
    assert ledger.items.register(RUN, CHILD, children("x")) == 1
    assert ledger.items.finish(finish(RUN, "services:x")) == 1

    assert ledger.items.register(RUN, CHILD, children("x")) == 0
    assert redis_client.hget(RunKeys.of(RUN).items, "services:x") == "s"
    snap = ledger.view.snapshot(RUN)
    assert snap is not None
    assert snap.pending == 1
    assert snap.stages[CHILD] == counters(enqueued=1, succeeded=1)


def test_registering_into_an_unknown_run_raises(ledger: Ledger, redis_client: redis.Redis) -> None:
    with pytest.raises(LedgerError) as refused:
        ledger.items.register("no-such-run", CHILD, children("x"))
    assert refused.value.code == "NORUN"
    assert str(refused.value) == "run no-such-run: the run is unknown or expired"
    assert redis_client.keys("*") == []


def test_every_refusal_of_a_script_is_a_ledger_error_with_its_code(ledger: Ledger) -> None:
    """One convention on every path: the script's code on ``code``, its words after the run."""
    unknown = {
        "register": lambda: ledger.items.register("gone", CHILD, children("x")),
        "batch map": lambda: ledger.maps.create("gone", "m1", "demo.services", CHILD, 1, None,
                                                False, children("x")),
        "stop": lambda: ledger.runs.stop("gone", "cancelled", "why"),
        "replay": lambda: ledger.runs.replay("gone", {"accounts:a": {}}),
    }
    for path, step in unknown.items():
        with pytest.raises(LedgerError) as refused:
            step()
        assert (refused.value.code, str(refused.value)) == (
            "NORUN", "run gone: the run is unknown or expired"), path

    ledger.runs.create(RUN, "demo", {}, ROOT, roots("a"))
    assert ledger.runs.stop(RUN, "killed", "a switch tripped") == 0
    with pytest.raises(LedgerError) as refused:
        ledger.runs.replay(RUN, {"accounts:a": {"account": "a"}})
    assert (refused.value.code, str(refused.value)) == ("STOPPED", f"run {RUN}: the run was killed")


# -- finish_item --------------------------------------------------------------------------


def test_a_duplicate_finish_returns_0_and_counts_nothing(ledger: Ledger) -> None:
    ledger.runs.create(RUN, "demo", {}, ROOT, roots("a", "b"))

    assert ledger.items.finish(finish(RUN, "accounts:a", rows=3)) == 1
    assert ledger.items.finish(finish(RUN, "accounts:a", rows=3)) == 0
    assert ledger.items.finish(finish(RUN, "accounts:a", Outcome.FAILED, failure={"e": 1})) == 0

    snap = ledger.view.snapshot(RUN)
    assert snap is not None
    assert (snap.status, snap.pending, snap.rows_written, snap.failed_items) == (
        "running", 1, 3, 0)
    assert snap.stages == {ROOT: counters(enqueued=2, succeeded=1)}


def test_the_last_item_finishes_the_run_succeeded(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    ledger.runs.create(RUN, "demo", {}, ROOT, roots("a", "b"))
    rk = RunKeys.of(RUN)

    assert ledger.items.finish(finish(RUN, "accounts:a")) == 1
    assert redis_client.llen(rk.done) == 0
    assert ledger.view.wait(RUN, timeout_s=0.05) is None
    assert ledger.items.finish(finish(RUN, "accounts:b")) == 2

    assert redis_client.lrange(rk.done, 0, -1) == ["succeeded"]
    for name, key in run_keys_now(redis_client, RUN).items():
        assert 0 < redis_client.ttl(key) <= TTL_S, name
    assert ledger.view.wait(RUN, timeout_s=0.1) == "succeeded"
    assert ledger.view.wait(RUN, timeout_s=0.1) == "succeeded"  # every waiter is told
    snap = ledger.view.snapshot(RUN)
    assert snap is not None
    assert (snap.status, snap.pending, snap.finished) == ("succeeded", 0, True)
    assert snap.finished_at is not None and snap.finished_at >= snap.created_at
    assert snap.stages == {ROOT: counters(enqueued=2, succeeded=2)}
    assert ledger.items.pending_payloads(RUN) == {}
    # A duplicate of the last item finishes nothing a second time.
    assert ledger.items.finish(finish(RUN, "accounts:b")) == 0
    assert redis_client.lrange(rk.done, 0, -1) == ["succeeded"]


def test_waiting_on_a_run_keeps_the_ttl_of_its_done_list(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    ledger.runs.create(RUN, "demo", {}, ROOT, roots("a"))
    assert ledger.items.finish(finish(RUN, "accounts:a")) == 2
    done = RunKeys.of(RUN).done
    assert 0 < redis_client.ttl(done) <= TTL_S

    assert ledger.view.wait(RUN, timeout_s=0.1) == "succeeded"

    assert redis_client.lrange(done, 0, -1) == ["succeeded"]
    assert 0 < redis_client.ttl(done) <= TTL_S  # -1: no TTL any more


def test_a_failed_item_is_recorded_and_the_run_ends_partial(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    ledger.runs.create(RUN, "demo", {}, ROOT, roots("a", "b"))
    failure = {"stage": ROOT, "item": "accounts:a", "error_type": "HTTPError",
               "message": "502 from vendor", "attempts": 3}

    assert ledger.items.finish(finish(RUN, "accounts:a", Outcome.FAILED, failure=failure)) == 1
    assert ledger.view.failures(RUN) == {"accounts:a": failure}
    assert redis_client.hget(RunKeys.of(RUN).failed, "accounts:a") == canonical_json(failure)
    assert ledger.items.finish(finish(RUN, "accounts:b")) == 2

    assert ledger.view.wait(RUN, timeout_s=0.1) == "partial"
    assert redis_client.lrange(RunKeys.of(RUN).done, 0, -1) == ["partial"]
    snap = ledger.view.snapshot(RUN)
    assert snap is not None
    assert (snap.status, snap.pending, snap.failed_items) == ("partial", 0, 1)
    assert snap.stages == {ROOT: counters(enqueued=2, succeeded=1, failed=1)}
    assert redis_client.hgetall(RunKeys.of(RUN).items) == {"accounts:a": "f", "accounts:b": "s"}


def test_results_are_kept_in_root_order_and_rows_counted(ledger: Ledger) -> None:
    ledger.runs.create(RUN, "demo", {}, ROOT, roots("a", "b", "c", "d"))

    # Finished out of order; "b" returns nothing.
    assert ledger.items.finish(finish(RUN, "accounts:c", rows=5, result={"x": 3})) == 1
    assert ledger.items.finish(finish(RUN, "accounts:a", rows=2, result=[1, 2])) == 1
    assert ledger.items.finish(finish(RUN, "accounts:b", rows=0)) == 1
    assert ledger.items.finish(finish(RUN, "accounts:d", rows=1, result=0)) == 2

    assert ledger.view.results(RUN) == [[1, 2], None, {"x": 3}, 0]
    snap = ledger.view.snapshot(RUN)
    assert snap is not None
    assert snap.rows_written == 8
    assert snap.stages == {ROOT: counters(enqueued=4, succeeded=4)}


def test_finish_batch_answers_per_item_and_minus_1_for_an_unregistered_one(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    ledger.runs.create(RUN, "demo", {}, ROOT, roots("a", "b"))

    with caplog.at_level(logging.ERROR, logger="fanout.ledger"):
        codes, _ = ledger.items.finish_batch([
            finish(RUN, "accounts:a", rows=1),
            finish(RUN, "accounts:never"),
            finish("no-such-run", "accounts:a"),
            finish(RUN, "accounts:a"),  # a duplicate within the same call
            finish(RUN, "accounts:b", rows=2),
        ])

    assert codes == [1, -1, -1, 0, 2]
    refused = [r.getMessage() for r in caplog.records if r.name == "fanout.ledger"]
    assert len(refused) == 2
    assert "accounts:never" in refused[0] and "NOITEM" in refused[0]
    assert "no-such-run" in refused[1] and "NOITEM" in refused[1]
    snap = ledger.view.snapshot(RUN)
    assert snap is not None
    assert (snap.status, snap.pending, snap.rows_written) == ("succeeded", 0, 3)
    assert snap.stages == {ROOT: counters(enqueued=2, succeeded=2)}
    assert ledger.view.snapshot("no-such-run") is None
    assert ledger.items.finish_batch([]) == ([], [])


def test_cached_and_skipped_items_count_under_their_names(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    ledger.runs.create(RUN, "demo", {}, ROOT, roots("a", "b", "c"))

    assert ledger.items.finish_batch([
        finish(RUN, "accounts:a", Outcome.CACHED),
        finish(RUN, "accounts:b", Outcome.SKIPPED),
    ]) == ([1, 1], [])
    assert ledger.items.finish(finish(RUN, "accounts:c", Outcome.CACHED)) == 2

    snap = ledger.view.snapshot(RUN)
    assert snap is not None
    assert snap.status == "succeeded"
    assert snap.stages == {ROOT: counters(enqueued=3, cached=2, skipped=1)}
    assert redis_client.hgetall(RunKeys.of(RUN).items) == {
        "accounts:a": "c", "accounts:b": "k", "accounts:c": "c"}


def test_progress_other_than_registering_refreshes_the_run_ttl(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    ledger.runs.create(RUN, "demo", {}, ROOT, roots("a", "b", "c"))
    rk = RunKeys.of(RUN)
    for key in (rk.run, rk.counts, rk.items):  # as if 500 s had passed without progress
        redis_client.expire(key, 100)

    assert ledger.loops.advance(RUN, ROOT, "accounts:a", 1, "cursor-2") is True
    assert ledger.items.finish(finish(RUN, "accounts:b")) == 1

    stale = {k: redis_client.ttl(k) for k in (rk.run, rk.counts, rk.items)}
    assert {k: ttl for k, ttl in stale.items() if ttl <= 500} == {}


def test_the_end_of_a_run_refreshes_the_ttl_of_its_roots_and_results(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    ledger.runs.create(RUN, "demo", {}, ROOT, roots("a", "b"))
    assert ledger.items.finish(finish(RUN, "accounts:a", result="A")) == 1
    for key in run_keys_now(redis_client, RUN).values():  # as if 500 s had passed
        redis_client.expire(key, 100)

    assert ledger.items.finish(finish(RUN, "accounts:b")) == 2

    ttls = {name: redis_client.ttl(key) for name, key in run_keys_now(redis_client, RUN).items()}
    assert {name: ttl for name, ttl in ttls.items() if ttl <= 500} == {}


# -- advance_loop -------------------------------------------------------------------------


def test_a_loop_advances_once_per_iteration(ledger: Ledger, redis_client: redis.Redis) -> None:
    ledger.runs.create(RUN, "demo", {}, ROOT, roots("a", "b"))

    assert ledger.loops.advance(RUN, ROOT, "accounts:a", 1, "cursor-2") is True
    assert ledger.loops.advance(RUN, ROOT, "accounts:a", 1, "cursor-2") is False  # duplicate
    assert ledger.loops.advance(RUN, ROOT, "accounts:a", 3, "cursor-4") is False  # not at 3
    assert ledger.loops.states(RUN) == {"accounts:a": {"iteration": 2, "payload": "cursor-2"}}
    assert ledger.loops.advance(RUN, ROOT, "accounts:a", 2, {"cursor": 3}) is True
    assert ledger.loops.advance(RUN, ROOT, "accounts:a", 2, {"cursor": 3}) is False

    assert ledger.loops.states(RUN) == {"accounts:a": {"iteration": 3, "payload": {"cursor": 3}}}
    assert ledger.items.progress_many([(RUN, "accounts:a"), (RUN, "accounts:b")]) == [
        ("p", 3, False), ("p", 1, False)]
    snap = ledger.view.snapshot(RUN)
    assert snap is not None
    assert snap.pending == 2
    assert snap.stages == {ROOT: {**counters(enqueued=2), "iterations": 2}}
    assert 0 < redis_client.ttl(RunKeys.of(RUN).loops) <= TTL_S


def test_a_stale_iteration_does_not_end_the_loop_and_the_current_one_does(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    ledger.runs.create(RUN, "demo", {}, ROOT, roots("a"))
    assert ledger.loops.advance(RUN, ROOT, "accounts:a", 1, "c2") is True
    assert ledger.loops.advance(RUN, ROOT, "accounts:a", 2, "c3") is True

    for stale in (1, 2):
        assert ledger.items.finish(finish(RUN, "accounts:a", iteration=stale, rows=9)) == 0
    assert redis_client.hget(RunKeys.of(RUN).items, "accounts:a") == "p"
    snap = ledger.view.snapshot(RUN)
    assert snap is not None
    assert (snap.status, snap.pending, snap.rows_written) == ("running", 1, 0)
    assert snap.stages == {ROOT: {**counters(enqueued=1), "iterations": 2}}

    assert ledger.items.finish(finish(RUN, "accounts:a", iteration=3, rows=4, result=34)) == 2

    snap = ledger.view.snapshot(RUN)
    assert snap is not None
    assert (snap.status, snap.pending, snap.rows_written) == ("succeeded", 0, 4)
    # Three iterations ran: two advances and the one that ended the item.
    assert snap.stages == {ROOT: {**counters(enqueued=1, succeeded=1), "iterations": 3}}
    assert ledger.loops.states(RUN) == {}
    assert ledger.view.results(RUN) == [34]
    # A terminal item does not loop again.
    assert ledger.loops.advance(RUN, ROOT, "accounts:a", 3, "c4") is False


def test_an_item_that_never_looped_ends_on_iteration_1_without_counting_iterations(
    ledger: Ledger,
) -> None:
    ledger.runs.create(RUN, "demo", {}, ROOT, roots("a"))
    assert ledger.items.finish(finish(RUN, "accounts:a", iteration=2)) == 0  # no iteration 2 yet
    assert ledger.items.finish(finish(RUN, "accounts:a", iteration=1)) == 2
    snap = ledger.view.snapshot(RUN)
    assert snap is not None
    assert snap.stages == {ROOT: counters(enqueued=1, succeeded=1)}


# -- the end of a run: one routine for every way (lua/_end_run.lua) ------------------------

# Every key's TTL is set back to this before the step that ends the run: older than fresh,
# yet above half the TTL, so no progress refresh is due and only the end refreshes them.
AGED_S = 400


@pytest.fixture
def scheduler(redis_client: redis.Redis, transport: RedisTransport) -> Scheduler:
    return Scheduler(redis_client, transport, TTL_S)


def tried_and_delayed(ledger: Ledger, scheduler: Scheduler, item: str) -> None:
    """A failed try of ``item`` and its retry waiting: the run's tries and delayed keys."""
    ledger.items.record_tries(RUN, item, 1)
    scheduler.later(Delivery(f"demo.{item.split(':', 1)[0]}", RUN, item, {}, attempt=2), 60)


def age_run_keys(client: redis.Redis, run_id: str) -> set[str]:
    """Every key of the run expires in AGED_S; returns the names of those that exist."""
    existing = run_keys_now(client, run_id)
    for key in existing.values():
        client.expire(key, AGED_S)
    return set(existing)


def ttls_not_refreshed(client: redis.Redis, run_id: str) -> dict[str, int]:
    """The run's keys whose TTL is not the ledger TTL (within a second)."""
    ttls = {name: client.ttl(key) for name, key in run_keys_now(client, run_id).items()}
    return {name: ttl for name, ttl in ttls.items() if not TTL_S - 1 <= ttl <= TTL_S}


def test_every_script_that_ends_a_run_is_given_every_run_key() -> None:
    lua = resources.files("workers").joinpath("lua")
    texts = {p.name.removesuffix(".lua"): p.read_text() for p in lua.iterdir()}
    enders = sorted(name for name, text in texts.items() if "\n-- INCLUDE: _end_run\n" in text)
    assert enders == ["advance_loop", "batch_settle", "create_run", "finish_item", "stop_run"]
    for name in enders:  # _end_run refreshes KEYS: they must be the run's keys, all of them
        assert scripts.load(name).keys == RUN_KEY_NAMES, name
    # Only the snippet tells the waiters: no script ends a run its own way.
    assert [n for n, text in texts.items() if "'RPUSH', done" in text] == ["_end_run"]


def test_the_last_item_to_finish_ends_the_run_and_refreshes_every_run_key(
    ledger: Ledger, scheduler: Scheduler, redis_client: redis.Redis
) -> None:
    ledger.runs.create(RUN, "demo", {}, ROOT, roots("a", "b"))
    assert ledger.items.register(RUN, CHILD, children("x")) == 1
    assert ledger.loops.advance(RUN, CHILD, "services:x", 1, "cursor-2") is True
    assert ledger.items.finish(finish(RUN, "accounts:a", result="A")) == 1
    failure = {"stage": ROOT, "item": {"account": "b"}, "error_type": "E", "message": "m",
               "attempts": 1}
    assert ledger.items.finish(finish(RUN, "accounts:b", Outcome.FAILED, failure=failure)) == 1
    tried_and_delayed(ledger, scheduler, "services:x")
    ledger.items.published(RUN, "fan-out")
    assert age_run_keys(redis_client, RUN) == {
        "run", "counts", "items", "failed", "payloads", "results", "loops", "roots", "delayed",
        "tries", "fanned"}

    assert ledger.items.finish(finish(RUN, "services:x", iteration=2)) == 2

    assert ledger.view.wait(RUN, timeout_s=0.1) == "partial"
    assert set(run_keys_now(redis_client, RUN)) == {
        "run", "counts", "items", "failed", "done", "results", "roots", "delayed", "tries",
        "fanned"}
    assert ttls_not_refreshed(redis_client, RUN) == {}


def batch_mapped_run(ledger: Ledger, n: int) -> list[str]:
    """A run whose roots are one batch map of ``n`` items in batches of 1, the first done
    and deciding; returns the item ids."""
    ids = [f"metric_day:{i}" for i in range(n)]
    assert ledger.runs.create(RUN, "demo", {}, "metric_day", [], hold=True) is True
    first = ledger.maps.create(RUN, "m1", "demo.metric_day", "metric_day", 1, None, False,
                               [(i, {"i": i}) for i in ids], as_roots=True)
    assert [i for i, _ in first] == ids[:1]
    assert ledger.items.finish_batch([finish(RUN, ids[0], result=0)]) == (
        [1], [MapSignal(RUN, "m1", deciding=True)])
    return ids


def test_settling_the_last_batch_ends_the_run_and_refreshes_every_run_key(
    ledger: Ledger, scheduler: Scheduler, redis_client: redis.Redis
) -> None:
    ids = batch_mapped_run(ledger, 2)
    assert [i for i, _ in ledger.maps.settle(RUN, "m1")] == ids[1:]
    tried_and_delayed(ledger, scheduler, ids[1])
    # The last item is done, but the map's token holds the run open until its switch check.
    assert ledger.items.finish_batch([finish(RUN, ids[1], result=1)]) == (
        [1], [MapSignal(RUN, "m1", deciding=True)])
    assert age_run_keys(redis_client, RUN) == {
        "run", "counts", "items", "results", "roots", "delayed", "tries", "batchmaps", "bmof"}

    assert ledger.maps.settle(RUN, "m1") == []

    assert ledger.view.wait(RUN, timeout_s=0.1) == "succeeded"
    snap = ledger.view.snapshot(RUN)
    assert snap is not None
    assert (snap.status, snap.pending) == ("succeeded", 0)
    assert snap.stages == {"metric_day": counters(enqueued=2, succeeded=2)}
    assert ledger.view.results(RUN) == [0, 1]
    assert set(run_keys_now(redis_client, RUN)) == {
        "run", "counts", "items", "done", "results", "roots", "delayed", "tries", "batchmaps",
        "bmof"}
    assert ttls_not_refreshed(redis_client, RUN) == {}


@pytest.mark.parametrize("status", ["killed", "cancelled"])
def test_stopping_a_run_with_nothing_in_flight_ends_it_and_refreshes_every_run_key(
    ledger: Ledger, scheduler: Scheduler, redis_client: redis.Redis, status: str
) -> None:
    """``killed``: a kill switch tripped after the first batch; ``cancelled``: by hand."""
    ids = batch_mapped_run(ledger, 3)
    tried_and_delayed(ledger, scheduler, ids[0])
    assert age_run_keys(redis_client, RUN) == {
        "run", "counts", "items", "results", "roots", "delayed", "tries", "batchmaps", "bmof",
        "bmqueue"}

    assert ledger.runs.stop(RUN, status, "why") == 2  # the two queued batches

    assert ledger.view.wait(RUN, timeout_s=0.1) == status
    snap = ledger.view.snapshot(RUN)
    assert snap is not None
    assert (snap.status, snap.pending, snap.stop_reason) == (status, 0, "why")
    assert snap.stages == {"metric_day": counters(enqueued=3, succeeded=1, skipped=2)}
    assert set(run_keys_now(redis_client, RUN)) == {
        "run", "counts", "items", "done", "results", "roots", "delayed", "tries", "batchmaps",
        "bmof"}
    assert ttls_not_refreshed(redis_client, RUN) == {}
    assert ledger.runs.stop(RUN, "cancelled", "again") == -1  # no longer running


# -- claim / release / give_back / restore_claimed (RedisTransport) ------------------------


def deliveries(n: int) -> list[Delivery]:
    return [Delivery("demo.metric_day", RUN, f"metric_day:m{i}", {"i": i}) for i in range(n)]


def queued(transport: RedisTransport, n: int) -> tuple[list[Delivery], str]:
    """``n`` leaf deliveries published on their queue, and the queue's name."""
    ds = deliveries(n)
    transport.publish(ds)
    return ds, ds[0].queue


def server_now_s(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def claimer(client: redis.Redis, worker: str) -> RedisTransport:
    return RedisTransport(client, ttl_s=TTL_S, owner=lambda: worker)


def test_claim_takes_from_the_consuming_end_in_fifo_order_and_names_its_worker(
    transport: RedisTransport, redis_client: redis.Redis
) -> None:
    ds, queue = queued(transport, 3)
    assert transport.queue_depth(queue) == 3

    before = server_now_s(redis_client)
    taken = claimer(redis_client, "w1").claim(queue, 2)
    after = server_now_s(redis_client)

    assert [decode_redis(raw) for raw in taken] == ds[:2]
    assert [decode_redis(raw) for raw in redis_client.lrange(queue, 0, -1)] == ds[2:]
    claimed = cast(list[tuple[str, float]],
                   redis_client.zrange(keys.claimed(queue), 0, -1, withscores=True))
    assert sorted(m for m, _ in claimed) == sorted(taken)
    assert all(before <= score <= after for _, score in claimed)  # the server's clock
    assert redis_client.hgetall(keys.claimers(queue)) == dict.fromkeys(taken, "w1")
    # The claimer is in the workers index from its first claim, beating or not.
    [(worker, seen)] = redis_client.zrange(keys.WORKERS, 0, -1, withscores=True)
    assert worker == "w1" and before <= seen <= after
    # Where to look for its claims when it dies.
    assert redis_client.smembers(keys.worker_queues("w1")) == {queue}
    for key in (keys.claimed(queue), keys.claimers(queue), keys.WORKERS,
                keys.worker_queues("w1")):
        assert 0 < redis_client.ttl(key) <= TTL_S
    assert transport.queue_depth(queue) == 3  # one queued, two claimed

    transport.release(queue, taken[:1])
    assert redis_client.zrange(keys.claimed(queue), 0, -1) == taken[1:]
    assert redis_client.hgetall(keys.claimers(queue)) == {taken[1]: "w1"}
    assert transport.queue_depth(queue) == 2

    rest = claimer(redis_client, "w2").claim(queue, 5)
    assert [decode_redis(raw) for raw in rest] == ds[2:]
    assert transport.claim(queue, 5) == []
    assert redis_client.llen(queue) == 0
    assert transport.claimed_messages([queue, "fanout.demo.empty"]) == [taken[1], *rest]
    transport.release(queue, [*taken[1:], *rest])
    transport.release(queue, [])
    assert transport.queue_depth(queue) == 0
    assert redis_client.exists(keys.claimed(queue), keys.claimers(queue)) == 0


def test_a_later_claim_does_not_move_a_workers_last_beat(
    transport: RedisTransport, redis_client: redis.Redis
) -> None:
    _, queue = queued(transport, 2)
    redis_client.zadd(keys.WORKERS, {"w1": 1000.0})  # its heartbeat stopped long ago

    assert len(claimer(redis_client, "w1").claim(queue, 1)) == 1

    assert redis_client.zscore(keys.WORKERS, "w1") == 1000.0  # still dead: no revival


def test_a_claim_takes_no_more_than_its_fair_share_of_the_queue(
    transport: RedisTransport, redis_client: redis.Redis
) -> None:
    ds, queue = queued(transport, 10)

    # 10 waiting, 4 threads compete: 10 // 4 = 2, though 8 were asked for.
    assert [decode_redis(raw) for raw in transport.claim(queue, 8, share=4)] == ds[:2]
    # 8 waiting, 3 threads: 2; then 6 waiting, 2 threads: 3 (under the 5 asked for).
    assert len(transport.claim(queue, 5, share=3)) == 2
    assert len(transport.claim(queue, 5, share=2)) == 3
    # 3 waiting, 4 threads: less than one each, so a claim takes none and the rest is
    # left to the threads' own deliveries.
    assert transport.claim(queue, 5, share=4) == []
    assert redis_client.llen(queue) == 3
    assert redis_client.zcard(keys.claimed(queue)) == 7


def test_restore_puts_back_the_claims_of_dead_workers_whatever_their_age(
    transport: RedisTransport, redis_client: redis.Redis
) -> None:
    ds, queue = queued(transport, 5)
    dead1 = claimer(redis_client, "dead").claim(queue, 2)
    [live] = claimer(redis_client, "live").claim(queue, 1)
    redis_client.zadd(keys.claimed(queue), {live: 1000.0}, xx=True)  # claimed long ago

    assert transport.restore_claims([queue], dead=["nobody"]) == 0
    assert transport.restore_claims([queue, "fanout.demo.empty"], dead=["dead"]) == 2

    assert redis_client.zrange(keys.claimed(queue), 0, -1) == [live]
    assert redis_client.hgetall(keys.claimers(queue)) == {live: "live"}
    assert transport.queue_depth(queue) == 5  # four queued, one claimed
    # Back at the consuming end, the first claimed first, before those that never left.
    again = transport.claim(queue, 4)
    assert [decode_redis(m) for m in again] == [ds[0], ds[1], ds[3], ds[4]]
    assert set(dead1) < set(again)
    assert redis_client.hgetall(keys.claimers(queue)) == {
        live: "live", **dict.fromkeys(again, worker_id())}
    assert transport.restore_claims([queue], dead=["dead"]) == 0  # claimed again: not its own


def test_restore_by_time_puts_back_what_was_claimed_before_a_restart_only(
    transport: RedisTransport, redis_client: redis.Redis
) -> None:
    ds, queue = queued(transport, 4)
    old, recent = claimer(redis_client, "live").claim(queue, 2)
    redis_client.zadd(keys.claimed(queue), {old: 1000.0, recent: 2000.0}, xx=True)

    assert transport.restore_claims([queue], claimed_before=999.0) == 0
    assert transport.restore_claims([queue], claimed_before=1500.0) == 1

    assert redis_client.zrange(keys.claimed(queue), 0, -1) == [recent]
    assert redis_client.hgetall(keys.claimers(queue)) == {recent: "live"}
    assert [decode_redis(m) for m in redis_client.lrange(queue, -1, -1)] == [ds[0]]
    assert transport.restore_claims([queue], claimed_before=server_now_s(redis_client) + 1) == 1
    assert redis_client.zcard(keys.claimed(queue)) == 0
    assert redis_client.llen(queue) == 4
    assert json.loads(redis_client.lrange(queue, 0, -1)[0])["headers"]["task"] == (
        "demo.metric_day")


def test_give_back_puts_claims_back_first_and_never_doubles_one(
    transport: RedisTransport, redis_client: redis.Redis
) -> None:
    ds, queue = queued(transport, 4)
    taken = transport.claim(queue, 3)
    # The reaper already put one back: giving it back again must not queue it twice.
    redis_client.zrem(keys.claimed(queue), taken[2])
    redis_client.hdel(keys.claimers(queue), taken[2])
    redis_client.rpush(queue, taken[2])

    assert transport.give_back(queue, taken) == 2
    assert transport.give_back(queue, []) == 0
    assert redis_client.zcard(keys.claimed(queue)) == 0
    assert redis_client.hlen(keys.claimers(queue)) == 0
    # Given back at the consuming end, in the order they were claimed, before the rest.
    assert [decode_redis(m) for m in transport.claim(queue, 4)] == [ds[0], ds[1], ds[2], ds[3]]


def test_what_redis_refused_to_release_or_give_back_is_settled_once_it_answers(
    transport: RedisTransport, redis_client: redis.Redis
) -> None:
    """A live worker's claims are never put back by another worker: when Redis is down as
    its batch ends, the worker keeps what it owes and settles it (at its next heartbeat)."""
    ds, queue = queued(transport, 4)
    batch = transport.claim(queue, 3)
    up = transport.redis
    down = redis.Redis(port=free_port(), retry=Retry(NoBackoff(), 0))  # no server there
    transport.redis = down
    with pytest.raises(redis.ConnectionError):
        transport.give_back(queue, batch[:2])  # the batch could not be recorded
    with pytest.raises(redis.ConnectionError):
        transport.release(queue, batch[2:])  # a dead-lettered one
    assert transport.settle() == 0  # still down: still owed
    assert redis_client.zcard(keys.claimed(queue)) == 3

    transport.redis = up
    assert transport.settle() == 3
    assert transport.settle() == 0  # once

    assert redis_client.exists(keys.claimed(queue), keys.claimers(queue)) == 0
    assert [decode_redis(m) for m in transport.claim(queue, 4)] == [ds[0], ds[1], ds[3]]
