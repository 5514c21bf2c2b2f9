"""``fanout beat`` reloads its config file: at once on SIGHUP, on its own when the file changes,
with one line that says what changed; a bad edit is one line and the config loaded before goes
on. A beat's schedules take their pipeline's run defaults (``[pipelines.NAME]``). The real
beat is a ``fanout beat`` process on the session's Redis and the demo vendor."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import VendorHandle, wait_for

from producers.beat import Beat, SlotStore
from producers.beat_reload import BeatConfig, describe_changes
from producers.config_file import RunDefaults
from producers.scheduling import Schedule, parse_schedule
from workers.limits import Limits, make_config
from workers.policy.kill_switch import AnyFailed, FailureCount

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def sched(name: str, **table: Any) -> Schedule:
    return parse_schedule(name, {"pipeline": "demo", **table})


class Trigger:
    """Stands for start_run: records each call's run id and batch options."""

    def __init__(self) -> None:
        self.options: dict[str, dict[str, Any]] = {}

    def __call__(self, pipeline: str, params: dict[str, Any], *, run_id: str,
                 **options: Any) -> str:
        self.options[run_id.split("-")[1]] = options
        return run_id


def test_a_schedule_takes_its_pipelines_run_defaults_under_its_own(
    redis_client: redis.Redis,
) -> None:
    trigger = Trigger()
    schedules = [sched("plain", every_s=10), sched("sized", every_s=10, batch_size=5),
                 sched("own", every_s=10, batch_size=3, kill_switch="failure_count:2")]
    store = SlotStore(redis_client, ttl_s=3600, grace_s=3600, lease_s=30)
    beat = Beat(schedules, store, grace_s=3600, trigger=trigger, clock=lambda: T0,
                run_defaults={"demo": RunDefaults(2, "any_failed")})
    beat.tick()
    assert trigger.options == {
        "plain": {"batch_size": 2, "kill_switch": AnyFailed()},
        "sized": {"batch_size": 5, "kill_switch": AnyFailed()},
        "own": {"batch_size": 3, "kill_switch": FailureCount(2)},
    }


def test_what_changed_is_said_in_one_line() -> None:
    old = BeatConfig(
        "fanout.toml", (sched("kept", every_s=5), sched("edited", every_s=5),
                        sched("gone", every_s=5)),
        {"demo": RunDefaults(2)}, {"vendor-a": make_config("vendor-a", "5/s", None, None)},
        {"demo.metric_day": {"retries": 2}, "demo.services": {"claim_batch": 4}})
    new = BeatConfig(
        "fanout.toml", (sched("kept", every_s=5), sched("edited", every_s=6),
                        sched("new", every_s=5), sched("other", every_s=5)),
        {}, {"vendor-a": make_config("vendor-a", "10/s", None, None),
             "vendor-b": make_config("vendor-b", None, None, 2)},
        {"demo.metric_day": {"retries": 2}, "demo.services": {"claim_batch": 8}})
    assert describe_changes(old, new) == (
        "schedules added: new, other, removed: gone, changed: edited; "
        "limits changed: vendor-a, vendor-b (the beat does not apply them: fanout limits "
        "apply); stage settings changed: demo.services (workers take them when restarted); "
        "run defaults changed: demo")
    assert describe_changes(new, new) == "nothing changed"


# --- a real fanout beat -----------------------------------------------------------------------


@pytest.fixture
def beat_process(started_processes: list[subprocess.Popen[bytes]]) -> list[subprocess.Popen[bytes]]:
    return started_processes


def write_same_stamp(path: Path, text: str) -> None:
    """Replace the file without changing what the beat's own look compares (its mtime and
    size), so only a SIGHUP can make the beat read it: ``text`` is padded to the old size."""
    old = path.stat()
    padding = old.st_size - len(text.encode())
    assert padding >= 2, "the new text must be shorter than the old"
    new = path.with_suffix(".new")
    new.write_text(text + "#" * (padding - 1) + "\n")
    os.utime(new, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(new, path)


def test_fanout_beat_reloads_on_sighup_and_on_an_edit_saying_what_changed(
    tmp_path: Path, vendor: VendorHandle, redis_url: str, redis_client: redis.Redis,
    beat_process: list[subprocess.Popen[bytes]],
) -> None:
    never = 'pipeline = "demo"\ncron = "0 {h} 1 1 *"\n'  # 1 January only: never due here
    params = f'{{ days = 1, end_day = "2026-01-31", vendor_url = "{vendor.url}" }}'
    tick = f'[schedules.tick]\nevery_s = 2\npipeline = "demo"\nparams = {params}\n\n'
    first = (f"[schedules.kept]\n{never.format(h=3)}\n[schedules.edited]\n{never.format(h=4)}\n"
             f"[schedules.first]\n{never.format(h=5)}\n"
             '[limits.cfg-a]\nrate = "5/s"\n\n[stages."demo.metric_day"]\nretries = 2\n'
             + "#" * 400 + "\n")  # room for the second, written at the same size
    second = (f"[schedules.kept]\n{never.format(h=3)}\n[schedules.edited]\n{never.format(h=6)}\n"
              f"{tick}"
              '[limits.cfg-a]\nrate = "10/s"\n\n[stages."demo.metric_day"]\nretries = 4\n\n'
              "[pipelines.demo]\nbatch_size = 5\n")
    config = tmp_path / "fanout.toml"
    config.write_text(first)
    log = tmp_path / "beat.log"
    beat_process.append(subprocess.Popen(
        [sys.executable, "-m", "producers.cli", "beat"],
        env={**os.environ, "FANOUT_REDIS_URL": redis_url, "FANOUT_CONFIG": str(config),
             "FANOUT_SCHEDULE_GRACE_S": "60"},
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True))
    beat = beat_process[0]

    def lines() -> list[str]:
        return re.findall(r"\] (beat: config .*)", log.read_text())

    def tick_runs() -> list[str]:
        return re.findall(r"-> run (sched-tick-\S+)", log.read_text())

    wait_for(lambda: "beat: schedule first" in log.read_text(), what="the beat started")
    beat.send_signal(signal.SIGHUP)
    wait_for(lambda: len(lines()) == 1, timeout_s=30, what="the reload line")
    assert lines() == [f"beat: config reloaded (SIGHUP) from {config}: nothing changed"]

    write_same_stamp(config, second)
    beat.send_signal(signal.SIGHUP)
    wait_for(lambda: len(lines()) == 2, timeout_s=30, what="the second reload line")
    assert lines()[1] == (
        f"beat: config reloaded (SIGHUP) from {config}: schedules added: tick, removed: first, "
        "changed: edited; limits changed: cfg-a (the beat does not apply them: fanout limits "
        "apply); stage settings changed: demo.metric_day (workers take them when restarted); "
        "run defaults changed: demo")
    wait_for(tick_runs, timeout_s=20, what="the new schedule fired")
    assert Limits(redis_client).list_limits() == []  # written by `fanout limits apply` only

    # A bad edit, seen without a signal: one line, and the schedules loaded before go on.
    config.write_text(second + '\n[schedules.bad]\ncron = "61 * * * *"\npipeline = "demo"\n')
    wait_for(lambda: len(lines()) == 3, timeout_s=30, what="the bad edit's line")
    assert lines()[2].startswith(
        f"beat: config not reloaded (the file changed), keeping what was loaded before: "
        f"{config}: schedule 'bad': bad cron '61 * * * *'")
    fired = len(tick_runs())
    wait_for(lambda: len(tick_runs()) > fired, timeout_s=20, what="tick firing on")

    config.write_text(second.replace(tick, ""))
    wait_for(lambda: len(lines()) == 4, timeout_s=30, what="the fixed edit's line")
    assert lines()[3] == (f"beat: config reloaded (the file changed) from {config}: "
                          "schedules removed: tick")
    beat.send_signal(signal.SIGTERM)
    assert beat.wait(timeout=20) == 0
    assert lines()[4:] == []
