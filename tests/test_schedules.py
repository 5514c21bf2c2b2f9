"""Schedules: the config file, slot arithmetic (a given clock, no sleeping), the beat's slot
logic against the session's Redis, the CLI, and two real ``fanout beat`` processes at once."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
from conftest import VendorHandle, WorkerFactory, sink_rows, wait_for

from producers.beat import Beat, FanoutScheduler, SlotStore
from producers.config_file import parse_limits
from producers.scheduling import (
    Schedule,
    grace_s,
    lease_s,
    load_schedules,
    parse_config,
    parse_schedule,
)
from workers import keys
from workers.celery import app
from workers.ledger import Ledger
from workers.policy.kill_switch import AnyFailed, FailureCount
from workers.settings import ConfigError

ROOT = Path(__file__).resolve().parents[1]
UTC = dt.UTC
PARIS = "Europe/Paris"


def at(*args: int, tz: str | None = None) -> dt.datetime:
    """A UTC time, or a local time in ``tz`` (as UTC)."""
    zone = UTC if tz is None else ZoneInfo(tz)
    return dt.datetime(*args).replace(tzinfo=zone).astimezone(UTC)  # type: ignore[arg-type]


def sched(name: str = "s", **table: Any) -> Schedule:
    return parse_schedule(name, {"pipeline": "demo", **table})


# --- the config file --------------------------------------------------------------------------


def test_the_example_config_parses() -> None:
    [daily] = load_schedules(ROOT / "examples" / "fanout.toml")
    assert daily == Schedule(name="demo_daily", pipeline="demo", cron="15 2 * * *", tz=PARIS,
                             params={"days": 1}, enabled=True)


def test_defaults() -> None:
    s = sched(every_s=2)
    assert (s.tz, s.params, s.enabled, s.cron, s.every_s) == ("UTC", {}, True, None, 2)
    assert sched(cron="0 * * * *", enabled=False).enabled is False


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ({"cron": "15 2 * * *", "crom": "x"}, "schedule 's': unknown key 'crom'"),
        ({"cron": "61 * * * *"}, "schedule 's': bad cron '61 * * * *'"),
        ({"cron": "* * * *"}, "cron must have 5 fields (minute hour day month weekday), "
                              "got '* * * *'"),
        ({"cron": "0 0 * * * *"}, "cron must have 5 fields"),
        ({"cron": "@daily"}, "got '@daily'"),
        ({"cron": "R * * * *"}, "random (R) fields are not supported"),
        ({"cron": 5}, "cron must have 5 fields"),
        ({"cron": "0 2 * * *", "pipeline": "nosuch"}, "schedule 's': unknown pipeline 'nosuch'"),
        ({"cron": "0 2 * * *", "tz": "Mars/Olympus"},
         "schedule 's': unknown time zone tz = 'Mars/Olympus'"),
        ({"cron": "0 2 * * *", "tz": "../etc/passwd"}, "unknown time zone"),
        ({"cron": "0 2 * * *", "every_s": 2}, "give exactly one of cron and every_s"),
        ({}, "give exactly one of cron and every_s"),
        ({"every_s": 0}, "every_s must be a whole number of seconds >= 1, got 0"),
        ({"every_s": "2"}, "got '2'"),
        ({"every_s": True}, "got True"),
        ({"every_s": 2, "tz": PARIS}, "tz applies to cron schedules only"),
        ({"every_s": 2, "params": "days=1"}, "params must be a table, got 'days=1'"),
        ({"every_s": 2, "params": {"days": 0}}, "schedule 's': --days must be a whole number"),
        ({"every_s": 2, "enabled": "yes"}, "enabled must be true or false, got 'yes'"),
        ({"every_s": 2, "pipeline": 3}, "pipeline must be a pipeline name, got 3"),
        ({"every_s": 2, "batch_size": 0}, "batch_size must be a whole number >= 1, got 0"),
        ({"every_s": 2, "batch_size": True}, "batch_size must be a whole number >= 1, got True"),
        ({"every_s": 2, "kill_switch": "any_failed"}, "kill_switch needs a batch_size"),
        ({"every_s": 2, "batch_size": 2, "kill_switch": 3},
         "kill_switch must be text like 'any_failed', got 3"),
        ({"every_s": 2, "batch_size": 2, "kill_switch": "sometimes"},
         "schedule 's': kill switch 'sometimes': expected one of any_failed"),
    ],
)
def test_a_bad_schedule_names_itself_and_the_value(table: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"schedules": {"s": {"pipeline": "demo", **table}}}, "fanout.toml")
    assert fragment in str(caught.value)
    assert str(caught.value).startswith("fanout.toml: ")


def test_bad_names_and_unknown_sections() -> None:
    with pytest.raises(ConfigError, match=r"schedule 'Daily': a name is \[a-z0-9_-\]\+"):
        parse_config({"schedules": {"Daily": {"every_s": 2, "pipeline": "demo"}}})
    with pytest.raises(ConfigError, match="unknown key 'schedule', did you mean 'schedules'\\? "
                                          "\\(known: schedules, limits, stages, pipelines\\)"):
        parse_config({"schedule": {}})
    with pytest.raises(ConfigError, match="schedule 'x': must be a table"):
        parse_config({"schedules": {"x": 1}})


def test_a_schedule_may_start_its_runs_as_a_batch_map() -> None:
    batched = sched(every_s=2, batch_size=2, kill_switch="failure_count:2")
    assert (batched.batch_size, batched.kill_switch) == (2, "failure_count:2")
    assert batched.run_options() == {"batch_size": 2, "kill_switch": FailureCount(2)}
    assert sched(every_s=2, batch_size=3).run_options() == {"batch_size": 3,
                                                           "kill_switch": None}
    assert sched(every_s=2).run_options() == {}


def test_limits_in_the_config_file() -> None:
    data = {"limits": {"vendor-a": {"rate": "50/s", "burst": 5},
                       "vendor-b": {"concurrency": 3},
                       "vendor-c": {"rate": "60/h", "concurrency": 2}}}
    found = {c.name: (str(c.rate), c.burst, c.concurrency) for c in parse_limits(data)}
    assert found == {"vendor-a": ("50/s", 5, None), "vendor-b": ("None", 1, 3),
                     "vendor-c": ("60/h", 1, 2)}
    assert parse_config(data) == []  # a file with limits only has no schedules


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ({}, "fanout.toml: limit 'v' needs a rate, a concurrency, or both"),
        ({"rate": "fast"}, "fanout.toml: bad rate 'fast': expected COUNT/UNIT"),
        ({"burst": 2, "concurrency": 1}, "limit 'v': a burst needs a rate"),
        ({"rate": "5/s", "burst": 0}, "burst must be a whole number >= 1, got 0"),
        ({"concurrency": "3"}, "concurrency must be a whole number >= 1, got '3'"),
        ({"rate": "5/s", "rps": 5}, "limit 'v': unknown key 'rps' (known: rate, burst, "
                                    "concurrency, ceiling, floor)"),
    ],
)
def test_a_bad_limit_names_itself(table: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_limits({"limits": {"v": table}}, "fanout.toml")
    assert fragment in str(caught.value)
    with pytest.raises(ConfigError, match="limit 'v': must be a table"):
        parse_limits({"limits": {"v": 5}})


def test_where_the_config_file_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FANOUT_CONFIG", raising=False)
    assert load_schedules() == []  # no file: no schedules
    (tmp_path / "fanout.toml").write_text('[schedules.here]\nevery_s = 5\npipeline = "demo"\n')
    assert [s.name for s in load_schedules()] == ["here"]
    other = tmp_path / "other.toml"
    other.write_text('[schedules.there]\ncron = "0 3 * * 1"\npipeline = "demo"\n')
    monkeypatch.setenv("FANOUT_CONFIG", str(other))
    assert [s.name for s in load_schedules()] == ["there"]
    monkeypatch.setenv("FANOUT_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match=r"FANOUT_CONFIG: no such file '.*missing\.toml'"):
        load_schedules()
    other.write_text("[schedules.x\n")
    monkeypatch.setenv("FANOUT_CONFIG", str(other))
    with pytest.raises(ConfigError, match=r"other\.toml: .*line 1"):
        load_schedules()


def test_grace_and_lease_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FANOUT_SCHEDULE_GRACE_S", raising=False)
    monkeypatch.delenv("FANOUT_SCHEDULE_LEASE_S", raising=False)
    assert (grace_s(), lease_s()) == (3600, 30)
    monkeypatch.setenv("FANOUT_SCHEDULE_GRACE_S", "0")
    monkeypatch.setenv("FANOUT_SCHEDULE_LEASE_S", "5")
    assert (grace_s(), lease_s()) == (0, 5)
    monkeypatch.setenv("FANOUT_SCHEDULE_LEASE_S", "0")
    with pytest.raises(ConfigError, match="FANOUT_SCHEDULE_LEASE_S must be >= 1, got 0"):
        lease_s()


# --- slots ------------------------------------------------------------------------------------


def test_cron_slots_in_a_time_zone() -> None:
    s = sched(cron="15 2 * * *", tz=PARIS)
    winter = at(2026, 12, 1, 12, 0)
    assert s.latest_slot(winter) == at(2026, 12, 1, 1, 15)  # 02:15 CET
    assert s.next_slot(winter) == at(2026, 12, 2, 1, 15)
    summer = at(2026, 7, 1, 12, 0)
    assert s.latest_slot(summer) == at(2026, 7, 1, 0, 15)  # 02:15 CEST
    # A slot is due at its own time: latest includes it, next is the one after.
    assert s.latest_slot(at(2026, 12, 1, 1, 15)) == at(2026, 12, 1, 1, 15)
    assert s.latest_slot(at(2026, 12, 1, 1, 14, 59)) == at(2026, 11, 30, 1, 15)
    assert s.next_slot(at(2026, 12, 1, 1, 15)) == at(2026, 12, 2, 1, 15)
    assert s.run_id(at(2026, 12, 1, 1, 15)) == "sched-s-20261201T011500Z"


def test_dst_changes_fire_a_fixed_time_once_a_day() -> None:
    s = sched(cron="15 2 * * *", tz=PARIS)
    # Clocks go back on 2026-10-25: 02:15 happens twice; it fires once (the first).
    autumn = s.slots_between(at(2026, 10, 23), at(2026, 10, 27))
    assert autumn == [at(2026, 10, 23, 0, 15), at(2026, 10, 24, 0, 15),
                      at(2026, 10, 25, 0, 15), at(2026, 10, 26, 1, 15)]
    assert s.latest_slot(at(2026, 10, 25, 1, 30)) == at(2026, 10, 25, 0, 15)
    assert s.next_slot(at(2026, 10, 25, 0, 15)) == at(2026, 10, 26, 1, 15)
    # Clocks go forward on 2026-03-29: 02:15 does not exist; it fires at the change, 03:00.
    spring = s.slots_between(at(2026, 3, 27), at(2026, 3, 31))
    assert spring == [at(2026, 3, 27, 1, 15), at(2026, 3, 28, 1, 15),
                      at(2026, 3, 29, 3, 0, tz=PARIS), at(2026, 3, 30, 0, 15)]


def test_a_wildcard_hour_keeps_both_passes_of_a_repeated_hour() -> None:
    s = sched(cron="*/30 * * * *", tz=PARIS)
    day = s.slots_between(at(2026, 10, 24, 22, 0) - dt.timedelta(seconds=1),
                          at(2026, 10, 25, 22, 59))  # the local day of 2026-10-25: 25 hours
    assert len(day) == 50
    assert len(set(day)) == 50


def test_every_s_slots_are_aligned_on_the_epoch() -> None:
    s = sched(every_s=2)
    now = at(2026, 12, 1, 12, 0, 13) + dt.timedelta(milliseconds=700)
    assert s.latest_slot(now) == at(2026, 12, 1, 12, 0, 12)
    assert s.next_slot(now) == at(2026, 12, 1, 12, 0, 14)
    assert s.latest_slot(at(2026, 12, 1, 12, 0, 14)) == at(2026, 12, 1, 12, 0, 14)
    assert s.slots_between(at(2026, 12, 1, 12, 0, 12), at(2026, 12, 1, 12, 0, 18)) == [
        at(2026, 12, 1, 12, 0, 14), at(2026, 12, 1, 12, 0, 16), at(2026, 12, 1, 12, 0, 18)]
    assert s.run_id(at(2026, 12, 1, 12, 0, 14)) == "sched-s-20261201T120014Z"
    manual = s.manual_run_id(now)
    assert manual == "sched-s-20261201T120013Z-manual"
    assert manual != s.run_id(at(2026, 12, 1, 12, 0, 13))


# --- one beat's slot logic, with a clock moved by hand ------------------------------------


class Clock:
    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


class Trigger:
    """Stands for start_run: records each call, fails while ``failures`` lasts."""

    def __init__(self, failures: int = 0) -> None:
        self.calls: list[str] = []
        self.options: list[dict[str, Any]] = []  # start_run's other keyword arguments
        self.failures = failures

    def __call__(self, pipeline: str, params: dict[str, Any], *, run_id: str,
                 **options: Any) -> str:
        self.calls.append(run_id)
        self.options.append(options)
        if self.failures:
            self.failures -= 1
            raise RuntimeError("vendor down")
        return run_id


def make_beat(client: redis.Redis, schedules: list[Schedule], clock: Clock, trigger: Trigger,
              *, grace_s: int = 3600, token: str | None = None) -> Beat:
    store = SlotStore(client, ttl_s=3600, grace_s=grace_s, lease_s=30)
    return Beat(schedules, store, grace_s=grace_s, trigger=trigger, clock=clock, token=token)


def ids(name: str, *slots: dt.datetime) -> list[str]:
    return [f"sched-{name}-{slot.strftime('%Y%m%dT%H%M%SZ')}" for slot in slots]


T0 = at(2026, 12, 1, 12, 0)


def test_one_beat_triggers_each_slot_once(redis_client: redis.Redis) -> None:
    clock, trigger = Clock(T0 + dt.timedelta(seconds=5)), Trigger()
    beat = make_beat(redis_client, [sched("ten", every_s=10)], clock, trigger)
    wait = beat.tick()  # started 5 s after a slot: that slot runs now
    assert trigger.calls == ids("ten", T0)
    assert wait == pytest.approx(5.01)
    beat.tick()
    assert len(trigger.calls) == 1
    clock.advance(5)
    beat.tick()
    clock.advance(35)  # a slow tick: every slot it passed runs, in order
    beat.tick()
    assert trigger.calls == ids("ten", *(T0 + dt.timedelta(seconds=s) for s in range(0, 50, 10)))
    assert SlotStore(redis_client, ttl_s=60, grace_s=0, lease_s=1).last_run("ten") == (
        ids("ten", T0 + dt.timedelta(seconds=40))[0], (T0 + dt.timedelta(seconds=40)).timestamp())
    for run_id in trigger.calls:
        assert redis_client.get(keys.schedule_slot(run_id)) == "fired"
        assert 0 < redis_client.ttl(keys.schedule_slot(run_id)) <= 3600 + 30 + 60
    assert 0 < redis_client.ttl(keys.schedule_runs("ten")) <= 3600


def test_a_batched_schedule_starts_its_run_as_a_batch_map(redis_client: redis.Redis) -> None:
    clock, trigger = Clock(T0 + dt.timedelta(seconds=1)), Trigger()
    schedules = [sched("plain", every_s=10),
                 sched("batched", every_s=10, batch_size=2, kill_switch="any_failed")]
    make_beat(redis_client, schedules, clock, trigger).tick()
    assert dict(zip(trigger.calls, trigger.options, strict=True)) == {
        ids("plain", T0)[0]: {},
        ids("batched", T0)[0]: {"batch_size": 2, "kill_switch": AnyFailed()},
    }


def test_two_beats_at_once_trigger_each_slot_once(redis_client: redis.Redis) -> None:
    clock, trigger = Clock(T0), Trigger()
    schedules = [sched("two", every_s=2), sched("five", every_s=5)]
    beats = [make_beat(redis_client, schedules, clock, trigger, token=t) for t in "ab"]
    for step in range(20):
        for beat in beats if step % 2 else reversed(beats):
            beat.tick()
        clock.advance(1)
    for beat in beats:
        beat.tick()
        assert beat.pending == {}
    assert sorted(trigger.calls) == sorted(set(trigger.calls))
    assert sorted(trigger.calls) == sorted(
        ids("two", *(T0 + dt.timedelta(seconds=s) for s in range(0, 21, 2)))
        + ids("five", *(T0 + dt.timedelta(seconds=s) for s in range(0, 21, 5))))


def test_a_missed_slot_runs_once_on_restart_within_the_grace(redis_client: redis.Redis) -> None:
    daily = sched("daily", cron="15 2 * * *", tz=PARIS)
    trigger = Trigger()
    # Down over three nights; back at 03:00 Paris, 45 minutes after the last slot.
    make_beat(redis_client, [daily], Clock(at(2026, 12, 4, 3, 0, tz=PARIS)), trigger).tick()
    assert trigger.calls == ids("daily", at(2026, 12, 4, 2, 15, tz=PARIS))
    # Back at 04:30, 2 h 15 after the slot: past the grace, nothing runs.
    late = Trigger()
    make_beat(redis_client, [daily], Clock(at(2026, 12, 5, 4, 30, tz=PARIS)), late).tick()
    assert late.calls == []
    # Restarted again the same night: the slot it ran is not run again.
    again = Trigger()
    make_beat(redis_client, [daily], Clock(at(2026, 12, 4, 3, 10, tz=PARIS)), again).tick()
    assert again.calls == []


def test_a_stalled_beat_runs_only_the_latest_missed_slot(redis_client: redis.Redis) -> None:
    clock, trigger = Clock(T0), Trigger()
    beat = make_beat(redis_client, [sched("two", every_s=2)], clock, trigger)
    beat.tick()
    clock.advance(600)  # suspended for 10 minutes: not 300 runs
    beat.tick()
    assert trigger.calls == ids("two", T0, T0 + dt.timedelta(seconds=600))


def test_a_slot_held_by_a_dead_beat_is_taken_over(redis_client: redis.Redis) -> None:
    clock, trigger = Clock(T0), Trigger()
    [held] = ids("two", T0)
    store = SlotStore(redis_client, ttl_s=60, grace_s=3600, lease_s=30)
    assert store.claim(held, "dead-beat")  # claimed, then the holder was SIGKILLed
    beat = make_beat(redis_client, [sched("two", every_s=2)], clock, trigger)
    assert beat.tick() == pytest.approx(1.01)  # held: looks again in a second
    assert trigger.calls == []
    clock.advance(2)
    beat.tick()  # the next slot runs; the held one stays pending
    assert trigger.calls == ids("two", T0 + dt.timedelta(seconds=2))
    assert list(beat.pending) == [held]
    redis_client.delete(keys.schedule_slot(held))  # the dead beat's lease lapses
    clock.advance(1)
    beat.tick()
    assert trigger.calls == ids("two", T0 + dt.timedelta(seconds=2), T0)
    assert beat.pending == {}


def test_a_slot_whose_run_exists_is_not_triggered(redis_client: redis.Redis) -> None:
    clock, trigger = Clock(T0), Trigger()
    [run_id] = ids("two", T0)
    redis_client.hset(keys.RunKeys.of(run_id).run, "status", "running")
    make_beat(redis_client, [sched("two", every_s=2)], clock, trigger).tick()
    assert trigger.calls == []


def test_a_failed_trigger_is_retried_with_backoff(redis_client: redis.Redis) -> None:
    clock, trigger = Clock(T0 + dt.timedelta(seconds=1)), Trigger(failures=2)
    beat = make_beat(redis_client, [sched("hourly", cron="0 * * * *")], clock, trigger)
    [run_id] = ids("hourly", T0)
    store = beat.store
    assert beat.tick() == pytest.approx(1.01)
    assert trigger.calls == [run_id]
    assert redis_client.get(keys.schedule_slot(run_id)) is None  # released: any beat retries
    error = store.last_error("hourly")
    assert error is not None
    assert error["message"] == "RuntimeError: vendor down"
    assert error["run_id"] == run_id
    beat.tick()
    assert len(trigger.calls) == 1  # not before its backoff
    clock.advance(1)
    assert beat.tick() == pytest.approx(2.01)
    assert len(trigger.calls) == 2
    clock.advance(2)
    beat.tick()
    assert trigger.calls == [run_id] * 3
    assert store.last_run("hourly") == (run_id, T0.timestamp())
    assert beat.pending == {}
    assert_every_schedule_key_expires(redis_client)


def assert_every_schedule_key_expires(client: redis.Redis) -> None:
    found = list(client.scan_iter("fanout:schedule:*"))
    assert found
    for key in found:
        assert client.ttl(key) > 0, key


def test_stopping_mid_trigger_gives_the_slot_back(redis_client: redis.Redis) -> None:
    def interrupted(*_: Any, **__: Any) -> str:
        raise SystemExit  # SIGTERM: Celery beat's handler raises SystemExit

    store = SlotStore(redis_client, ttl_s=60, grace_s=3600, lease_s=30)
    beat = Beat([sched("two", every_s=2)], store, grace_s=3600, trigger=interrupted,
                clock=Clock(T0))
    with pytest.raises(SystemExit):
        beat.tick()
    assert redis_client.get(keys.schedule_slot(ids("two", T0)[0])) is None


def test_a_disabled_schedule_never_fires(redis_client: redis.Redis) -> None:
    clock, trigger = Clock(T0), Trigger()
    beat = make_beat(redis_client, [sched("off", every_s=2, enabled=False)], clock, trigger)
    beat.tick()
    clock.advance(10)
    beat.tick()
    assert trigger.calls == []


def test_a_new_config_keeps_unchanged_schedules_in_time(redis_client: redis.Redis) -> None:
    clock, trigger = Clock(T0 + dt.timedelta(seconds=1)), Trigger()
    kept, edited = sched("kept", every_s=10), sched("edited", every_s=10)
    beat = make_beat(redis_client, [kept, edited, sched("removed", every_s=10)], clock, trigger)
    beat.tick()
    assert sorted(trigger.calls) == sorted(ids("kept", T0) + ids("edited", T0)
                                           + ids("removed", T0))

    clock.advance(5)  # T0 + 6 s
    beat.replace_schedules([kept, sched("edited", every_s=2), sched("added", every_s=10),
                            sched("off", every_s=10, enabled=False)])
    assert [s.name for s in beat.schedules] == ["kept", "edited", "added"]
    beat.tick()
    # "kept" replays nothing. The edited one starts afresh, as on a beat's start: its latest
    # slot only (T0+6), not the T0+2 and T0+4 it would have had since T0; the new one too.
    at_ = [T0 + dt.timedelta(seconds=n) for n in range(12)]
    assert sorted(trigger.calls[3:]) == sorted(ids("edited", at_[6]) + ids("added", T0))
    clock.advance(5)  # T0 + 11 s: from here every schedule runs each slot it passes
    beat.tick()
    assert sorted(trigger.calls[5:]) == sorted(
        ids("kept", at_[10]) + ids("added", at_[10]) + ids("edited", at_[8], at_[10]))


def test_fanout_beat_rereads_an_edited_config_and_keeps_the_old_one_if_bad(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "fanout.toml"
    config.write_text('[schedules.daily]\ncron = "0 3 * * *"\npipeline = "demo"\n')
    monkeypatch.setenv("FANOUT_CONFIG", str(config))
    scheduler = FanoutScheduler(app)
    assert scheduler.beat is not None
    assert [s.name for s in scheduler.beat.schedules] == ["daily"]
    # The next slot is hours away, yet the beat wakes every max_interval to look.
    assert 0 < scheduler.step() <= FanoutScheduler.max_interval
    assert scheduler.reload_if_changed() is False  # nothing changed

    config.write_text('[schedules.daily]\ncron = "0 3 * * *"\npipeline = "demo"\n\n'
                      '[schedules.hourly]\ncron = "5 * * * *"\npipeline = "demo"\n')
    assert scheduler.reload_if_changed() is False  # seen once: it may be half written yet
    assert scheduler.reload_if_changed() is True  # the same at the next look: read
    assert [s.name for s in scheduler.beat.schedules] == ["daily", "hourly"]

    config.write_text('[schedules.hourly]\ncron = "61 * * * *"\npipeline = "demo"\n')
    assert scheduler.reload_if_changed() is False  # a bad edit: the loaded ones go on
    assert [s.name for s in scheduler.beat.schedules] == ["daily", "hourly"]
    scheduler.close()


# --- the command line -------------------------------------------------------------------------


def fanout(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
           timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "producers.cli", *args], capture_output=True,
                          text=True, timeout=timeout_s, env={**os.environ, **(env or {})},
                          cwd=cwd)


def assert_one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fanout: error: ")
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("command", [["schedules"], ["schedules", "--json"], ["beat"],
                                     ["schedules", "run", "daily"]])
@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ('cron = "15 2 * * *"\ncrom = 1', "schedule 'daily': unknown key 'crom'"),
        ('cron = "15 25 * * *"', "schedule 'daily': bad cron '15 25 * * *'"),
        ('cron = "15 2 * * *"\ntz = "Europe/Pariss"',
         "schedule 'daily': unknown time zone tz = 'Europe/Pariss'"),
    ],
)
def test_a_bad_config_is_one_line_and_exit_2(tmp_path: Path, command: list[str], table: str,
                                             fragment: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(f'[schedules.daily]\npipeline = "demo"\n{table}\n')
    assert_one_line_error(fanout(*command, env={"FANOUT_CONFIG": str(config)}), fragment)


def test_an_unknown_pipeline_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[schedules.daily]\ncron = "0 3 * * *"\npipeline = "nosuch"\n')
    assert_one_line_error(fanout("beat", env={"FANOUT_CONFIG": str(config)}),
                          "schedule 'daily': unknown pipeline 'nosuch'")


def test_beat_without_schedules_and_an_unknown_name_are_one_line(tmp_path: Path) -> None:
    env = {"FANOUT_CONFIG": ""}
    assert_one_line_error(fanout("beat", env=env, cwd=tmp_path),
                          "no schedules in FANOUT_CONFIG or ./fanout.toml")
    (tmp_path / "fanout.toml").write_text('[schedules.tick]\nevery_s = 5\npipeline = "demo"\n')
    assert_one_line_error(fanout("schedules", "run", "nosuch", env=env, cwd=tmp_path),
                          "unknown schedule 'nosuch' (configured: tick)")
    assert_one_line_error(fanout("beat", env={**env, "FANOUT_SCHEDULE_GRACE_S": "soon"},
                                 cwd=tmp_path),
                          "FANOUT_SCHEDULE_GRACE_S must be a whole number, got 'soon'")


def demo_config(path: Path, vendor: VendorHandle, name: str, when: str) -> Path:
    params = f'{{ days = 2, end_day = "2026-01-31", vendor_url = "{vendor.url}" }}'
    path.write_text(f'[schedules.{name}]\n{when}\npipeline = "demo"\nparams = {params}\n')
    return path


def test_schedules_lists_and_runs_one_now(tmp_path: Path, vendor: VendorHandle,
                                          start_worker: WorkerFactory) -> None:
    config = demo_config(tmp_path / "fanout.toml", vendor, "nightly",
                         'cron = "0 3 * * *"\ntz = "Europe/Paris"')
    env = {"FANOUT_CONFIG": str(config)}
    before = fanout("schedules", "--json", env=env)
    assert before.returncode == 0, before.stderr
    [row] = json.loads(before.stdout)
    assert row["name"] == "nightly" and row["cron"] == "0 3 * * *" and row["tz"] == PARIS
    assert row["enabled"] is True and row["pipeline"] == "demo"
    assert row["last_run_id"] is None and row["last_status"] is None
    next_local = dt.datetime.fromisoformat(row["next_fire_local"])
    assert (next_local.hour, next_local.minute) == (3, 0)
    next_at = dt.datetime.fromisoformat(row["next_fire_at"])
    assert dt.timedelta(0) < next_at - dt.datetime.now(UTC) <= dt.timedelta(hours=25)

    start_worker()
    ran = fanout("schedules", "run", "nightly", "--wait", "--json", env=env)
    assert ran.returncode == 0, ran.stderr
    summary = json.loads(ran.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded"
    assert summary["rows_written"] == 12
    assert re.fullmatch(r"sched-nightly-\d{8}T\d{6}Z-manual", summary["run_id"])

    [row] = json.loads(fanout("schedules", "--json", env=env).stdout)
    assert (row["last_run_id"], row["last_status"]) == (summary["run_id"], "succeeded")
    text = fanout("schedules", env=env)
    assert text.returncode == 0
    assert "nightly" in text.stdout and summary["run_id"] in text.stdout
    assert "0 3 * * *" in text.stdout and "succeeded" in text.stdout


# --- two fanout beat processes at once --------------------------------------------------------


@pytest.fixture
def beats(started_processes: list[subprocess.Popen[bytes]]) -> list[subprocess.Popen[bytes]]:
    return started_processes


def fired(log: Path) -> list[str]:
    """The run ids this beat triggered, from its log."""
    return re.findall(r"-> run (sched-\S+)", log.read_text())


def test_two_beats_each_slot_once_and_one_sigkilled(
    tmp_path: Path, vendor: VendorHandle, start_worker: WorkerFactory, redis_url: str,
    redis_client: redis.Redis, sink_path: Path, beats: list[subprocess.Popen[bytes]],
) -> None:
    every = sched("tick", every_s=2)
    config = demo_config(tmp_path / "fanout.toml", vendor, "tick", "every_s = 2")
    start_worker()
    env = {**os.environ, "FANOUT_REDIS_URL": redis_url, "FANOUT_CONFIG": str(config),
           "FANOUT_SCHEDULE_LEASE_S": "3"}
    logs = [tmp_path / f"beat{i}.log" for i in range(2)]
    for log in logs:
        beats.append(subprocess.Popen(
            [sys.executable, "-m", "producers.cli", "beat"], env=env,
            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True))

    def runs() -> list[str]:
        return sorted(str(r) for r in redis_client.zrange(keys.RUNS_INDEX, 0, -1))

    wait_for(lambda: len(runs()) >= 3, timeout_s=20, what="three slots")
    # SIGKILL the beat that triggered the latest slot: the other has to carry on alone.
    latest = runs()[-1]
    victim = wait_for(lambda: [i for i, log in enumerate(logs) if latest in fired(log)],
                      timeout_s=5, what="the beat that triggered it")[0]
    os.killpg(beats[victim].pid, signal.SIGKILL)
    beats[victim].wait()
    killed_at = dt.datetime.now(UTC)
    survivor = beats[1 - victim]

    def slot_of(run_id: str) -> dt.datetime:
        stamp = run_id.rsplit("-", 1)[1]
        return dt.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)

    def taken_since_kill() -> set[str]:
        return {r for r in runs() if slot_of(r) > killed_at}

    wait_for(lambda: len(taken_since_kill()) >= 3, timeout_s=20,
             what="three slots after the SIGKILL")
    # SIGTERM once the survivor's log has caught up with the runs it made: a beat stopped
    # mid-trigger gives its slot up unlogged, its run possibly made (beat.py), so a SIGTERM
    # the instant a run appears would leave that run out of the log.
    def logged_by_survivor() -> set[str] | None:
        taken = taken_since_kill()
        return taken if taken <= set(fired(logs[1 - victim])) else None

    taken = wait_for(logged_by_survivor, timeout_s=10, what="the survivor's log naming its runs")
    survivor.send_signal(signal.SIGTERM)
    assert survivor.wait(timeout=20) == 0

    run_ids = runs()
    assert all(re.fullmatch(r"sched-tick-\d{8}T\d{6}Z", r) for r in run_ids), run_ids
    slots = [slot_of(r) for r in run_ids]
    # Every slot from the first to the last, none missed: one run each (run ids are unique).
    assert slots == [slots[0] + dt.timedelta(seconds=2 * i) for i in range(len(slots))]
    assert len(slots) >= 6
    assert run_ids == [every.run_id(slot) for slot in slots]
    assert taken <= set(fired(logs[1 - victim]))  # the survivor took them all
    assert not set(fired(logs[victim])) & {r for r in run_ids if slot_of(r) > killed_at}
    assert not set(fired(logs[0])) & set(fired(logs[1]))  # no slot triggered by both

    ledger = Ledger(redis_client, 3600)
    for run_id in run_ids:
        assert ledger.view.wait(run_id, timeout_s=20) == "succeeded", run_id
        snap = ledger.view.snapshot(run_id)
        assert snap is not None
        assert snap.rows_written == 12, run_id  # 2 accounts x 3 services x 2 days, once
        assert snap.stages["accounts"]["enqueued"] == 2, run_id
        assert snap.stages["metric_day"]["succeeded"] == 12, run_id
    assert len(sink_rows(sink_path)) == 12  # every run upserted the same rows
    assert_every_schedule_key_expires(redis_client)
    # Each run's roots were listed by one beat: a claim is held by one beat at a time
    # (one more listing if a beat died between listing and creating its run).
    listed = vendor.stats()["by_endpoint"]["accounts"]
    assert len(run_ids) <= listed <= len(run_ids) + 1
