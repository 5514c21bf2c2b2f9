"""fanout's config file: TOML at ``FANOUT_CONFIG`` (default ``fanout.toml`` in the working
directory, if it exists), with two sections::

    [schedules.demo_daily]       # producers on a schedule (producers/scheduling.py)
    cron = "15 2 * * *"
    pipeline = "demo"

    [limits.demo-vendor]         # global limits, created or replaced by `fanout limits apply`
    rate = "50/s"                # calls per period: 10/s, 60/h, 100/15m
    burst = 1                    # calls that may pass at once (with a rate)
    concurrency = 8              # calls in flight at most

A limit needs a rate, a concurrency, or both (``workers/limits.py`` checks them).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workers.limits import LimitConfig, make_config
from workers.settings import ConfigError

DEFAULT_CONFIG = "fanout.toml"
SECTIONS = ("schedules", "limits")
LIMIT_KEYS = ("rate", "burst", "concurrency")


def config_path() -> Path | None:
    """``FANOUT_CONFIG`` (which must exist), else ``./fanout.toml`` if it exists, else None."""
    raw = os.environ.get("FANOUT_CONFIG")
    if raw:
        path = Path(raw)
        if not path.is_file():
            raise ConfigError(f"FANOUT_CONFIG: no such file {raw!r}")
        return path
    default = Path(DEFAULT_CONFIG)
    return default if default.is_file() else None


def config_stamp() -> tuple[str, int, int] | None:
    """What changes when the config file is edited, replaced or removed: its path, mtime
    and size (None without a file)."""
    try:
        path = config_path()
    except ConfigError:
        return None  # FANOUT_CONFIG names a file that is gone
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    return str(path), stat.st_mtime_ns, stat.st_size


def read_config(path: Path | None = None) -> tuple[dict[str, Any], str]:
    """The config file's tables and its name ({} and "" without a file); a file that is not
    TOML or has an unknown section is a ConfigError naming it."""
    path = path or config_path()
    if path is None:
        return {}, ""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    check_sections(data, str(path))
    return data, str(path)


def check_sections(data: Mapping[str, Any], source: str) -> None:
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(f"{source}: unknown key {key!r} (known: {', '.join(SECTIONS)})")


def section(data: Mapping[str, Any], name: str, source: str) -> dict[str, Any]:
    tables = data.get(name, {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{source}: {name!r} must be a table of {name}")
    return tables


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
                                      table.get("concurrency")))
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return limits
