"""fanout's config file: TOML at ``FANOUT_CONFIG`` (default ``fanout.toml`` in the working
directory, if it exists), with four sections::

    [schedules.demo_daily]       # producers on a schedule (producers/scheduling.py)
    cron = "15 2 * * *"
    pipeline = "demo"

    [limits.demo-vendor]         # global limits, created or replaced by `fanout limits apply`
    rate = "50/s"                # calls per period: 10/s, 60/h, 100/15m
    burst = 1                    # calls that may pass at once (with a rate)
    concurrency = 8              # calls in flight at most

    [stages."demo.metric_day"]   # a stage's settings over its Python declaration
    retries = 5                  # (workers/stage_config.py: every option of Pipeline.stage
    limits = ["demo-vendor"]     # but maps_to and hooks, checked by the same owners)

    [pipelines.demo]             # the defaults of a pipeline's runs, for `fanout run` and
    batch_size = 100             # schedules: its roots as a batch map of this size...
    kill_switch = "failure_rate:20:0.5"   # ...stopped when this trips
    per_item = false             # check the switch after every item, not every batch

A limit needs a rate, a concurrency, or both (``workers/limits.py`` checks them); ``rate =
"auto"`` finds the vendor's limit, optionally between ``floor`` and ``ceiling`` rates. A run's
own ``--batch-size``/``--kill-switch``/``--per-item`` (or a schedule's ``batch_size`` and
``kill_switch``) win over its pipeline's defaults, each on its own.

Who reads what, and when: every process that loads pipelines applies ``[stages]`` once, when it
loads them (a worker when it starts: restart workers to take an edit). ``fanout beat`` reads
the whole file at start, again at once on SIGHUP, and within a second or two of an edit,
logging one line that says what changed; an edit that does not parse is logged and what was
loaded before goes on. The beat never writes limits: ``[limits]`` take effect when ``fanout
limits apply`` writes them to Redis, so a limit tuned by hand (``fanout limits set``) is not
undone by a beat that restarts.

The reading of the file (its path, TOML, its sections) is ``workers/config_file.py``, below
the workers, which read ``[stages]`` too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producers.trigger import load_configured_pipelines
from workers.api import get_pipeline
from workers.config_file import check_sections, config_path, config_stamp, read_config, section
from workers.limits import LimitConfig, make_config
from workers.policy import kill_switch
from workers.policy.kill_switch import Switch
from workers.settings import ConfigError

__all__ = [  # the reading of the file, kept importable from here
    "check_sections", "config_path", "config_stamp", "read_config", "section",
]

LIMIT_KEYS = ("rate", "burst", "concurrency", "ceiling", "floor")
RUN_KEYS = ("batch_size", "kill_switch", "per_item")


def load_limits(path: Path | None = None) -> list[LimitConfig]:
    """The limits of the config file (none without one); a bad one is a ConfigError."""
    data, source = read_config(path)
    return parse_limits(data, source or "config")


def parse_limits(data: Mapping[str, Any], source: str = "config") -> list[LimitConfig]:
    check_sections(data, source)
    limits = []
    for name, table in section(data, "limits", source).items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: limit {name!r}: must be a table, got {table!r}")
        for key in table:
            if key not in LIMIT_KEYS:
                raise ConfigError(f"{source}: limit {name!r}: unknown key {key!r} "
                                  f"(known: {', '.join(LIMIT_KEYS)})")
        try:
            limits.append(make_config(name, table.get("rate"), table.get("burst"),
                                      table.get("concurrency"), ceiling=table.get("ceiling"),
                                      floor=table.get("floor")))
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return limits


@dataclass(frozen=True)
class RunDefaults:
    """A pipeline's ``[pipelines.NAME]``: how its runs start unless a run says otherwise."""

    batch_size: int | None = None
    kill_switch: str | None = None  # its text form (kill_switch.parse)
    per_item: bool = False

    def fill(self, batch_size: int | None = None, kill_switch: Switch | None = None,
             per_item: bool = False) -> dict[str, Any]:
        """``start_run``'s batch options: those given, else these ({} for no batch map)."""
        size = batch_size if batch_size is not None else self.batch_size
        if kill_switch is None and self.kill_switch is not None:
            kill_switch = kill_switch_from_text(self.kill_switch)
        if size is None:
            return {}
        options: dict[str, Any] = {"batch_size": size, "kill_switch": kill_switch}
        if per_item or self.per_item:
            options["per_item"] = True
        return options


def check_batch_options(batch_size: Any, switch: Any) -> None:
    """A ``batch_size`` and a ``kill_switch`` (text) as a table gives them, each optional;
    ValueError naming the bad one."""
    if batch_size is not None and not (
        isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1
    ):
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if switch is not None:
        if not isinstance(switch, str):
            raise ValueError(f"kill_switch must be text like 'any_failed', got {switch!r}")
        kill_switch.parse(switch)


def kill_switch_from_text(text: str) -> Switch:
    try:
        return kill_switch.parse(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def load_run_defaults(path: Path | None = None) -> dict[str, RunDefaults]:
    """Each pipeline's run defaults from the config file; a bad table is a ConfigError."""
    data, source = read_config(path)
    return parse_run_defaults(data, source or "config")


def run_defaults(pipeline: str) -> RunDefaults:
    """``pipeline``'s run defaults in the config file (none: no batch map)."""
    return load_run_defaults().get(pipeline, RunDefaults())


def parse_run_defaults(data: Mapping[str, Any], source: str = "config") -> dict[str, RunDefaults]:
    check_sections(data, source)
    tables = section(data, "pipelines", source)
    if tables:
        load_configured_pipelines()
    return {name: _run_defaults(name, table, source) for name, table in tables.items()}


def _run_defaults(name: str, table: Any, source: str) -> RunDefaults:
    def bad(message: str) -> ConfigError:
        return ConfigError(f"{source}: pipeline {name!r}: {message}")

    try:
        get_pipeline(name)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if not isinstance(table, dict):
        raise bad(f"must be a table, got {table!r}")
    for key in table:
        if key not in RUN_KEYS:
            raise bad(f"unknown key {key!r} (known: {', '.join(RUN_KEYS)})")
    size, switch, per_item = (table.get("batch_size"), table.get("kill_switch"),
                              table.get("per_item", False))
    try:
        check_batch_options(size, switch)
    except ValueError as exc:
        raise bad(str(exc)) from None
    if not isinstance(per_item, bool):
        raise bad(f"per_item must be true or false, got {per_item!r}")
    if per_item and switch is None:
        raise bad("per_item needs a kill_switch")
    return RunDefaults(size, switch, per_item)
