"""``fanout beat``: Celery beat whose scheduler starts the runs of the configured schedules.

Every beat process is active (no leader to elect, so none to wait for when one dies): at each
slot of a schedule, each beat claims the slot in Redis (``SET NX`` with a lease); the one that
gets it lists the roots and creates the run, under the slot's run id, then marks the slot
``fired``; the others keep the slot until it is fired (and take it over once the claim's lease
lapses, should its holder die first). The run id is the same on every beat, and creating a run
is idempotent, so even two beats that both trigger one slot create one run.

- Every slot that falls due while a beat runs is triggered, in order.
- A slot that fell due while no beat ran (or while its loop was stalled for over a minute) is
  triggered once when one ticks again, if it is at most ``FANOUT_SCHEDULE_GRACE_S`` old: only
  the latest such slot of each schedule, never a replay of everything missed.
- A failed trigger (the vendor would not list the roots) is tried again, 1 s, 2 s, 4 s ... up
  to a minute apart, by any beat, until the slot is older than the grace period.

The config file is read at start, again at once on SIGHUP, and within one or two
``FILE_CHECK_S`` of an edit (a change is read once two looks agree, so a file caught half
written waits); each reload logs one line saying what changed (``beat_reload.py``). A file
that does not parse is logged, and what was loaded before goes on. The beat applies
``[stages]`` to its own pipelines and uses ``[pipelines]`` for its runs, but never writes
``[limits]`` to Redis: ``fanout limits apply`` does (``producers/config_file.py`` says why).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from celery.beat import Scheduler
from celery.utils.log import get_logger

from producers.beat_reload import RELOAD, BeatConfig, describe_changes, load_beat_config
from producers.config_file import RunDefaults, config_stamp
from producers.scheduling import UTC, Schedule, grace_s, lease_s, load_schedules
from producers.trigger import start_run
from workers import keys
from workers.connections import get_redis
from workers.keys import RunKeys
from workers.settings import ConfigError, get_settings

logger = get_logger("fanout.beat")

Clock = Callable[[], dt.datetime]
Trigger = Callable[..., str]

#: A beat whose previous tick is older than this was not running: the slots it missed
#: count as missed while down (only the latest runs), as after a restart.
STALL_S = 60.0
#: How soon to look again at a slot another beat holds.
RECHECK_S = 1.0
MAX_BACKOFF_S = 60.0
#: How soon a waiting beat sees that its config file changed (one stat call each time).
FILE_CHECK_S = 1.0
FIRED = "fired"
RUNS_KEPT = 100

# Take the slot if nobody holds it, or renew it if this beat does. 1: ours now; 0: not.
_CLAIM = """
local held = redis.call('GET', KEYS[1])
if held == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _now() -> dt.datetime:
    return dt.datetime.now(UTC)


class SlotStore:
    """The Redis side of the slots: claims, the ``fired`` marks, each schedule's runs."""

    def __init__(self, client: redis.Redis, *, ttl_s: int, grace_s: int, lease_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.lease_ms = lease_s * 1000
        # A slot is looked at until it is grace_s old; the mark outlives that.
        self.fired_ttl_s = grace_s + lease_s + 60
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)

    def done(self, run_id: str) -> bool:
        """Fired by some beat: marked, or its run exists."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(keys.schedule_slot(run_id))
        pipe.exists(RunKeys.of(run_id).run)
        mark, exists = pipe.execute()
        return mark == FIRED or bool(exists)

    def claim(self, run_id: str, token: str) -> bool:
        return bool(self._claim(keys=[keys.schedule_slot(run_id)],
                                args=[f"claimed {token}", self.lease_ms]))

    def release(self, run_id: str, token: str) -> None:
        self._release(keys=[keys.schedule_slot(run_id)], args=[f"claimed {token}"])

    def fired(self, schedule: str, run_id: str, slot: dt.datetime) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(keys.schedule_slot(run_id), FIRED, ex=self.fired_ttl_s)
        self._record(pipe, schedule, run_id, slot)
        pipe.execute()

    def record_run(self, schedule: str, run_id: str, at: dt.datetime) -> None:
        """A run triggered by hand (``fanout schedules run``)."""
        pipe = self.redis.pipeline(transaction=False)
        self._record(pipe, schedule, run_id, at)
        pipe.execute()

    def _record(self, pipe: Any, schedule: str, run_id: str, at: dt.datetime) -> None:
        runs = keys.schedule_runs(schedule)
        pipe.zadd(runs, {run_id: at.timestamp()})
        pipe.zremrangebyrank(runs, 0, -RUNS_KEPT - 1)
        pipe.expire(runs, self.ttl_s)

    def failed(self, schedule: str, run_id: str, slot: dt.datetime, message: str) -> None:
        error = {"run_id": run_id, "slot": slot.isoformat(), "message": message,
                 "at": _now().isoformat()}
        self.redis.set(keys.schedule_error(schedule), json.dumps(error), ex=self.ttl_s)

    def last_run(self, schedule: str) -> tuple[str, float] | None:
        last = self.redis.zrevrange(keys.schedule_runs(schedule), 0, 0, withscores=True)
        return (str(last[0][0]), float(last[0][1])) if last else None

    def last_error(self, schedule: str) -> dict[str, Any] | None:
        raw = self.redis.get(keys.schedule_error(schedule))
        return dict(json.loads(str(raw))) if raw else None


def store_from_settings(client: redis.Redis | None = None) -> SlotStore:
    return SlotStore(client or get_redis(), ttl_s=get_settings().ledger_ttl_s,
                     grace_s=grace_s(), lease_s=lease_s())


@dataclass
class Pending:
    schedule: Schedule
    slot: dt.datetime
    failures: int = 0
    retry_at: dt.datetime | None = None

    @property
    def run_id(self) -> str:
        return self.schedule.run_id(self.slot)


class Beat:
    """One beat's slot logic, with no Celery in it: ``tick()`` triggers what is due and says
    how long to sleep. The clock and the trigger are given, so tests move time by hand."""

    def __init__(
        self,
        schedules: Iterable[Schedule],
        store: SlotStore,
        *,
        grace_s: int,
        trigger: Trigger = start_run,
        clock: Clock = _now,
        token: str | None = None,
        run_defaults: Mapping[str, RunDefaults] | None = None,
    ) -> None:
        self.schedules = [s for s in schedules if s.enabled]
        #: Each pipeline's ``[pipelines.NAME]``, under a schedule's own batch options.
        self.run_defaults = dict(run_defaults or {})
        self.store = store
        self.grace = dt.timedelta(seconds=grace_s)
        self.trigger = trigger
        self.clock = clock
        self.token = token or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.pending: dict[str, Pending] = {}
        self._seen: dict[str, dt.datetime] = {}
        self._last_tick: dt.datetime | None = None
        self._holding: str | None = None

    def replace_schedules(self, schedules: Iterable[Schedule]) -> None:
        """The config changed: an unchanged schedule keeps its place in time (no slot is
        replayed); a new or changed one starts afresh, as when a beat starts (its latest slot
        runs if within the grace period); the pending slots of a removed, disabled or changed
        one are dropped."""
        new = {s.name: s for s in schedules if s.enabled}
        for schedule in self.schedules:
            if new.get(schedule.name) != schedule:
                self._seen.pop(schedule.name, None)
        self.pending = {run_id: p for run_id, p in self.pending.items()
                        if new.get(p.schedule.name) == p.schedule}
        self.schedules = list(new.values())

    def tick(self) -> float:
        """Trigger every slot that is due; seconds until something may be due again."""
        now = self.clock()
        running = (self._last_tick is not None
                   and (now - self._last_tick).total_seconds() <= STALL_S)
        self._last_tick = now
        for schedule in self.schedules:
            self._collect(schedule, now, running)
        for key in sorted(self.pending, key=lambda k: self.pending[k].slot):
            try:
                self._attempt(self.pending[key], now)
            except redis.RedisError as exc:
                logger.error("beat: Redis error, trying again: %s", exc)
                break
        return self._wait_s(self.clock())

    def _collect(self, schedule: Schedule, now: dt.datetime, running: bool) -> None:
        latest = schedule.latest_slot(now)
        seen = self._seen.get(schedule.name)
        self._seen[schedule.name] = latest
        if running and seen is not None:
            new = schedule.slots_between(seen, latest)
        elif seen is None or latest > seen:
            new = [latest]  # started, or stalled: the latest missed slot only
        else:
            new = []
        for slot in new:
            if now - slot <= self.grace:
                pending = Pending(schedule, slot)
                self.pending.setdefault(pending.run_id, pending)

    def _attempt(self, pending: Pending, now: dt.datetime) -> None:
        run_id = pending.run_id
        if now - pending.slot > self.grace:
            logger.warning("beat: %s: gave up on slot %s (older than the grace period)",
                           pending.schedule.name, pending.slot.isoformat())
            del self.pending[run_id]
            return
        if pending.retry_at is not None and now < pending.retry_at:
            return
        if self.store.done(run_id):
            del self.pending[run_id]
            return
        if not self.store.claim(run_id, self.token):
            return  # another beat is on it: look again soon
        schedule = pending.schedule
        self._holding = run_id
        try:
            defaults = self.run_defaults.get(schedule.pipeline, RunDefaults())
            self.trigger(schedule.pipeline, dict(schedule.params), run_id=run_id,
                         **schedule.run_options(defaults))
        except Exception as exc:
            self.store.release(run_id, self.token)
            pending.failures += 1
            delay = min(MAX_BACKOFF_S, 2.0 ** (pending.failures - 1))
            pending.retry_at = now + dt.timedelta(seconds=delay)
            message = f"{type(exc).__name__}: {exc}"
            self.store.failed(schedule.name, run_id, pending.slot, message)
            logger.error("beat: %s: slot %s failed (%s), trying again in %.0fs",
                         schedule.name, pending.slot.isoformat(), message, delay)
            return
        except BaseException:
            self.close()  # SIGTERM mid-trigger: let another beat take the slot at once
            raise
        finally:
            self._holding = None
        self.store.fired(schedule.name, run_id, pending.slot)
        del self.pending[run_id]
        late = (self.clock() - pending.slot).total_seconds()
        logger.info("beat: %s: slot %s -> run %s (%.1fs after the slot)", schedule.name,
                    pending.slot.isoformat(), run_id, late)

    def _wait_s(self, now: dt.datetime) -> float:
        waits = [(s.next_slot(now) - now).total_seconds() for s in self.schedules]
        for pending in self.pending.values():
            retry_at = pending.retry_at
            waits.append((retry_at - now).total_seconds() if retry_at else RECHECK_S)
        # Wake just after a slot, so that it counts as due.
        return max(0.01, min(waits, default=STALL_S / 2) + 0.01)

    def close(self) -> None:
        """Give up the slot being triggered, if any (the process is stopping)."""
        if self._holding is not None:
            with contextlib.suppress(redis.RedisError):  # else the lease lapses on its own
                self.store.release(self._holding, self.token)
            self._holding = None


def _log_schedules(schedules: Iterable[Schedule]) -> None:
    for schedule in schedules:
        state = "enabled" if schedule.enabled else "disabled"
        logger.info("beat: schedule %s (%s, %s) -> pipeline %s, %s", schedule.name,
                    schedule.when, schedule.tz, schedule.pipeline, state)


class FanoutScheduler(Scheduler):
    """Celery beat's scheduler for fanout: the schedules come from the config file, and a due
    slot starts a run in this process (``start_run``) rather than sending a task."""

    #: Sleep at most this long: a tick costs a few Redis round trips, and Celery's remote
    #: control (if on) calls a beat stale after twice this.
    max_interval = 30

    def __init__(self, app: Celery, *args: Any, **kwargs: Any) -> None:
        self.beat: Beat | None = None
        self.config = BeatConfig()
        self._stamp: tuple[str, int, int] | None = None  # of the file last read
        self._looked: tuple[str, int, int] | None = None  # at the last look
        super().__init__(app, *args, **kwargs)  # calls setup_schedule unless lazy

    def setup_schedule(self) -> None:
        RELOAD.install()
        self._stamp = self._looked = config_stamp()
        self.config = load_beat_config()
        self.beat = Beat(self.config.schedules, store_from_settings(), grace_s=grace_s(),
                         run_defaults=self.config.run_defaults)
        _log_schedules(self.config.schedules)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Trigger what is due, then wait here until something may be due, SIGHUP asks for a
        reload or the file changes; 0: Celery's loop calls again at once (its own sleep
        could not be woken)."""
        if self.beat is None:
            return float(self.max_interval)
        self.wait(self.step())
        return 0.0

    def step(self) -> float:
        """Reload the config if asked to or if it changed, trigger what is due; seconds until
        something may be due again."""
        self.reload_if_changed()
        assert self.beat is not None
        return min(self.beat.tick(), float(self.max_interval))

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while (left_s := deadline - time.monotonic()) > 0:
            if RELOAD.pending or self._file_changed():
                return
            RELOAD.wait(min(left_s, FILE_CHECK_S))

    def _file_changed(self) -> bool:
        """The file differs from the one read, and did not change since the last look: an
        edit seen while it is being written (an empty file, half a table) waits one look."""
        stamp = config_stamp()
        settled = stamp == self._looked
        self._looked = stamp
        return settled and stamp != self._stamp

    def reload_if_changed(self) -> bool:
        """Read the config file again on SIGHUP, or if it changed since it was read, and log
        one line saying what changed. A bad file is logged, and what was loaded before goes
        on. Returns whether the new config was taken."""
        asked = RELOAD.take()
        if self.beat is None or not (asked or self._file_changed()):
            return False
        self._stamp = self._looked = config_stamp()
        why = "SIGHUP" if asked else "the file changed"
        try:
            config = load_beat_config()
        except ConfigError as exc:
            logger.error("beat: config not reloaded (%s), keeping what was loaded before: %s",
                         why, exc)
            return False
        logger.info("beat: config reloaded (%s) from %s: %s", why, config.source,
                    describe_changes(self.config, config))
        self.config = config
        self.beat.replace_schedules(config.schedules)
        self.beat.run_defaults = dict(config.run_defaults)
        return True

    def close(self) -> None:
        if self.beat is not None:
            self.beat.close()
        super().close()

    @property
    def info(self) -> str:
        schedules = load_schedules()
        enabled = sum(1 for s in schedules if s.enabled)
        return (f"    . schedules -> {len(schedules)} ({enabled} enabled), "
                f"grace {grace_s()}s, lease {lease_s()}s; the config is read again on "
                "SIGHUP or an edit")
