"""Schedules from the config file (``config_file.py``), and their slots: pure functions of a
given time::

    [schedules.demo_daily]
    cron = "15 2 * * *"          # 5 fields, in `tz`; or every_s = 2 (seconds, for tests)
    tz = "Europe/Paris"          # default UTC
    pipeline = "demo"
    params = { days = 1 }        # the run's parameters
    enabled = true               # default true
    batch_size = 2               # optional: the roots run as a batch map, 2 at a time...
    kill_switch = "any_failed"   # ...stopped when this trips (policy/kill_switch.py's parse)

A slot is one time a schedule fires; its run id is ``sched-NAME-YYYYMMDDTHHMMSSZ`` (the slot
in UTC), the same on every beat, so a slot triggered twice creates one run. A local time that
a DST change skips fires at the change; one it repeats fires once (a schedule whose hour field
starts with ``*`` keeps both, as cron does).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from producers.config_file import (
    check_batch_options,
    check_sections,
    config_path,
    read_config,
    section,
)
from producers.trigger import load_configured_pipelines
from workers.api import get_pipeline
from workers.policy import kill_switch
from workers.settings import ConfigError, env_int

__all__ = ["config_path"]  # where the file is: kept importable from here

UTC = dt.UTC
DEFAULT_GRACE_S = 3600
DEFAULT_LEASE_S = 30
NAME_RE = re.compile(r"[a-z0-9_-]+")
KEYS = ("cron", "every_s", "tz", "pipeline", "params", "enabled", "batch_size", "kill_switch")
_STAMP = "%Y%m%dT%H%M%SZ"
_MAX_SLOTS = 10_000  # slots_between never walks further (a stalled beat replays at most this)


@dataclass(frozen=True)
class Schedule:
    name: str
    pipeline: str
    cron: str | None = None
    every_s: int | None = None
    tz: str = "UTC"
    params: Mapping[str, Any] = field(default_factory=dict)
    enabled: bool = True
    batch_size: int | None = None  # the roots as a batch map of this size
    kill_switch: str | None = None  # its switch, in text form (kill_switch.parse)

    def run_options(self) -> dict[str, Any]:
        """``start_run``'s batch map options for this schedule's runs."""
        if self.batch_size is None:
            return {}
        switch = None if self.kill_switch is None else kill_switch.parse(self.kill_switch)
        return {"batch_size": self.batch_size, "kill_switch": switch}

    @property
    def zone(self) -> dt.tzinfo:
        return ZoneInfo(self.tz)

    @property
    def when(self) -> str:
        """The schedule as a person reads it: the cron expression, or ``every 2s``."""
        return self.cron if self.cron is not None else f"every {self.every_s}s"

    def run_id(self, slot: dt.datetime) -> str:
        return f"sched-{self.name}-{slot.astimezone(UTC).strftime(_STAMP)}"

    def manual_run_id(self, now: dt.datetime) -> str:
        """``fanout schedules run``: derived from now, never equal to a slot's run id."""
        return f"{self.run_id(now.replace(microsecond=0))}-manual"

    def latest_slot(self, now: dt.datetime) -> dt.datetime:
        """The last slot at or before ``now`` (UTC)."""
        if self.every_s is not None:
            second = int(now.timestamp())
            return dt.datetime.fromtimestamp(second - second % self.every_s, UTC)
        base = now.astimezone(self.zone).replace(microsecond=0) + dt.timedelta(seconds=1)
        it = croniter(self.cron, base)
        while True:
            slot = _utc(it.get_prev(dt.datetime))
            if not self._repeated(slot):
                return slot

    def next_slot(self, now: dt.datetime) -> dt.datetime:
        """The first slot after ``now`` (UTC)."""
        if self.every_s is not None:
            return self.latest_slot(now) + dt.timedelta(seconds=self.every_s)
        it = croniter(self.cron, now.astimezone(self.zone))
        while True:
            slot = _utc(it.get_next(dt.datetime))
            if slot > now and not self._repeated(slot):
                return slot

    def slots_between(self, after: dt.datetime, upto: dt.datetime) -> list[dt.datetime]:
        """Every slot in ``(after, upto]``, oldest first (at most the latest 10,000)."""
        slots: list[dt.datetime] = []
        slot = self.next_slot(after)
        while slot <= upto:
            slots.append(slot)
            if len(slots) > _MAX_SLOTS:
                del slots[0]
            slot = self.next_slot(slot)
        return slots

    def _repeated(self, slot: dt.datetime) -> bool:
        """The second pass of a local time that a DST change repeats, for a schedule with a
        fixed hour: ``15 2 * * *`` fires once on the night clocks go back."""
        assert self.cron is not None
        if self.cron.split()[1].startswith("*"):
            return False
        local = slot.astimezone(self.zone)
        ambiguous = local.replace(fold=0).utcoffset() != local.replace(fold=1).utcoffset()
        return ambiguous and local.fold == 1


def _utc(value: dt.datetime) -> dt.datetime:
    return value.astimezone(UTC)


def grace_s() -> int:
    """How old a slot missed while no beat ran may be and still run (once)."""
    return env_int("FANOUT_SCHEDULE_GRACE_S", DEFAULT_GRACE_S, 0)


def lease_s() -> int:
    """How long a beat's claim on a slot lasts before another beat may trigger it."""
    return env_int("FANOUT_SCHEDULE_LEASE_S", DEFAULT_LEASE_S, 1)


def load_schedules(path: Path | None = None) -> list[Schedule]:
    """The schedules of the config file (none without one); a bad one is a ConfigError."""
    data, source = read_config(path)
    return parse_config(data, source or "config")


def parse_config(data: Mapping[str, Any], source: str = "config") -> list[Schedule]:
    """The schedules of a config file's tables (``config_file.read_config``)."""
    check_sections(data, source)
    tables = section(data, "schedules", source)
    return [parse_schedule(name, table, source) for name, table in tables.items()]


def parse_schedule(name: str, table: Any, source: str = "config") -> Schedule:
    def bad(message: str) -> ConfigError:
        return ConfigError(f"{source}: schedule {name!r}: {message}")

    if not NAME_RE.fullmatch(name):
        raise bad("a name is [a-z0-9_-]+")
    if not isinstance(table, dict):
        raise bad(f"must be a table, got {table!r}")
    for key in table:
        if key not in KEYS:
            raise bad(f"unknown key {key!r} (known: {', '.join(KEYS)})")
    cron, every_s = table.get("cron"), table.get("every_s")
    if (cron is None) == (every_s is None):
        raise bad("give exactly one of cron and every_s")
    tz = table.get("tz", "UTC")
    if not isinstance(tz, str):
        raise bad(f"tz must be a time zone name, got {tz!r}")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise bad(f"unknown time zone tz = {tz!r}") from None
    if cron is not None:
        _check_cron(cron, bad)
    elif not isinstance(every_s, int) or isinstance(every_s, bool) or every_s < 1:
        raise bad(f"every_s must be a whole number of seconds >= 1, got {every_s!r}")
    elif "tz" in table:
        raise bad("tz applies to cron schedules only")
    pipeline = table.get("pipeline")
    if not isinstance(pipeline, str):
        raise bad(f"pipeline must be a pipeline name, got {pipeline!r}")
    params = table.get("params", {})
    if not isinstance(params, dict):
        raise bad(f"params must be a table, got {params!r}")
    load_configured_pipelines()
    try:
        flow = get_pipeline(pipeline)
        if flow.check_params:
            flow.check_params(dict(params))
    except ConfigError as exc:
        raise bad(str(exc)) from None
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise bad(f"enabled must be true or false, got {enabled!r}")
    batch_size, switch = table.get("batch_size"), table.get("kill_switch")
    if switch is not None and batch_size is None:
        raise bad("kill_switch needs a batch_size")
    try:
        check_batch_options(batch_size, switch)
    except ValueError as exc:
        raise bad(str(exc)) from None
    return Schedule(name=name, pipeline=pipeline, cron=cron, every_s=every_s, tz=tz,
                    params=params, enabled=enabled, batch_size=batch_size, kill_switch=switch)


def _check_cron(cron: Any, bad: Any) -> None:
    if not isinstance(cron, str) or len(cron.split()) != 5:
        raise bad(f"cron must have 5 fields (minute hour day month weekday), got {cron!r}")
    # Random fields would put the slots of two beats at different times.
    if any(part.upper().startswith("R") for f in cron.split() for part in f.split(",")):
        raise bad(f"bad cron {cron!r}: random (R) fields are not supported")
    try:
        croniter(cron)
    except (ValueError, KeyError) as exc:
        raise bad(f"bad cron {cron!r}: {exc}") from None
