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
    priority = 3                 # optional: its runs' weight when runs share a stage (1-100)

A pipeline whose root items are data (no roots function, or other roots than it lists) gets
them as ``items = [...]`` or ``items_file = "repos.json"`` (relative to the config file; a
JSON array or JSON lines, read again each time the schedule fires), and ``root_stage`` where
several stages could take them (``trigger.root_stage_of``).

A slot is one time a schedule fires; its run id is ``sched-NAME-YYYYMMDDTHHMMSSZ`` (the slot
in UTC), the same on every beat, so a slot triggered twice creates one run. A local time that
a DST change skips fires at the change; one it repeats fires once (a schedule whose hour field
starts with ``*`` keeps both, as cron does).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from producers.config_file import (
    RunDefaults,
    check_batch_options,
    check_sections,
    config_path,
    read_config,
    section,
)
from producers.items import read_items
from producers.trigger import check_priority, load_configured_pipelines, root_stage_of
from workers.api import Pipeline, get_pipeline
from workers.policy import kill_switch
from workers.settings import ConfigError, env_int

__all__ = ["config_path"]  # where the file is: kept importable from here

UTC = dt.UTC
DEFAULT_GRACE_S = 3600
DEFAULT_LEASE_S = 30
NAME_RE = re.compile(r"[a-z0-9_-]+")
KEYS = ("cron", "every_s", "tz", "pipeline", "params", "enabled", "batch_size", "kill_switch",
        "items", "items_file", "root_stage", "priority")
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
    items: tuple[Any, ...] | None = None  # the root items, given in the config file...
    items_file: str | None = None  # ...or in this file (absolute), read at each fire
    root_stage: str | None = None  # where they go (default: trigger.root_stage_of)
    priority: int | None = None  # its runs' weight in the fair share (trigger.start_run)

    def run_options(self, defaults: RunDefaults | None = None) -> dict[str, Any]:
        """``start_run``'s other options for this schedule's runs: its root items, if it
        gives them (an ``items_file`` is read now), and its batch map, each key of it the
        schedule's own or else the pipeline's run ``defaults`` (``[pipelines.NAME]``)."""
        options: dict[str, Any] = {}
        if self.items is not None:
            options["roots"] = list(self.items)
        elif self.items_file is not None:
            options["roots"] = read_items(self.items_file,
                                          label=f"schedule {self.name!r}: items_file")
        if self.root_stage is not None:
            options["root_stage"] = self.root_stage
        switch = None if self.kill_switch is None else kill_switch.parse(self.kill_switch)
        options.update((defaults or RunDefaults()).fill(self.batch_size, switch))
        if self.priority is not None:
            options["priority"] = self.priority
        return options

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
    base = Path(source).parent if source else Path()
    return parse_config(data, source or "config", base)


def parse_config(data: Mapping[str, Any], source: str = "config",
                 base: Path | None = None) -> list[Schedule]:
    """The schedules of a config file's tables (``config_file.read_config``); ``base``: the
    directory an ``items_file`` is relative to (the config file's)."""
    check_sections(data, source)
    tables = section(data, "schedules", source)
    return [parse_schedule(name, table, source, base) for name, table in tables.items()]


def parse_schedule(name: str, table: Any, source: str = "config",
                   base: Path | None = None) -> Schedule:
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
    items, items_file, root_stage = _roots(table, flow, base or Path(), bad)
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
    priority = table.get("priority")
    if priority is not None:
        try:
            check_priority(priority)
        except ConfigError as exc:
            raise bad(str(exc)) from None
    return Schedule(name=name, pipeline=pipeline, cron=cron, every_s=every_s, tz=tz,
                    params=params, enabled=enabled, batch_size=batch_size, kill_switch=switch,
                    items=items, items_file=items_file, root_stage=root_stage,
                    priority=priority)


def _roots(
    table: dict[str, Any], flow: Pipeline, base: Path, bad: Callable[[str], ConfigError]
) -> tuple[tuple[Any, ...] | None, str | None, str | None]:
    """A schedule's root items (``items``, or ``items_file`` relative to ``base``, read once
    here to check it) and ``root_stage``, checked against its pipeline."""
    items, items_file, root_stage = (table.get(k) for k in ("items", "items_file", "root_stage"))
    if items is not None and items_file is not None:
        raise bad("give items or items_file, not both")
    if items is not None and (not isinstance(items, list) or not items):
        raise bad(f"items must be a non-empty list of root items, got {items!r}")
    try:
        json.dumps(items)
    except (TypeError, ValueError) as exc:  # a TOML date or time is no JSON value
        raise bad(f"items must be JSON values: {exc}") from None
    if items_file is not None:
        if not isinstance(items_file, str) or not items_file:
            raise bad(f"items_file must be a path, got {items_file!r}")
        items_file = str((base / items_file).absolute())
        try:
            read_items(items_file, label="items_file")
        except ConfigError as exc:
            raise bad(str(exc)) from None
    given = items is not None or items_file is not None
    if root_stage is not None and not isinstance(root_stage, str):
        raise bad(f"root_stage must be a stage name, got {root_stage!r}")
    if root_stage is not None and not given:
        raise bad("root_stage is where items or items_file go: give one of them")
    if not given and flow.list_roots is None:
        raise bad(f"pipeline {flow.name!r} has no roots function: give its root items "
                  "(items = [...] or items_file = \"PATH\")")
    if given:
        try:
            root_stage_of(flow, root_stage)
        except ConfigError as exc:
            raise bad(str(exc)) from None
    return (tuple(items) if items is not None else None), items_file, root_stage


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
