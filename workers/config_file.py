"""Where fanout's config file is and how it is read: TOML at ``FANOUT_CONFIG`` (default
``fanout.toml`` in the working directory, if it exists). The tables it may hold are listed in
``SECTIONS``; each is parsed by the one that uses it: ``[stages]`` by ``workers/stage_config.py``
(where pipelines are loaded: workers, producers, beats), ``[schedules]``, ``[limits]`` and
``[pipelines]`` by ``producers/config_file.py`` (documented there)."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workers.options import did_you_mean
from workers.settings import ConfigError

DEFAULT_CONFIG = "fanout.toml"
SECTIONS = ("schedules", "limits", "stages", "pipelines")


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
            raise ConfigError(f"{source}: unknown key {key!r}{did_you_mean(key, SECTIONS)} "
                              f"(known: {', '.join(SECTIONS)})")


def section(data: Mapping[str, Any], name: str, source: str) -> dict[str, Any]:
    tables = data.get(name, {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{source}: {name!r} must be a table of {name}")
    return tables

