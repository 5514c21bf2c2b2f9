"""Configuration from FANOUT_* environment variables, read once at the boundary.

Units live in the names (``_s``, ``_ms``) so nobody has to guess.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Pipelines every worker and producer loads; FANOUT_PIPELINES=module,module adds more.
BUILTIN_PIPELINES = ("workers.pipelines.demo",)


class ConfigError(Exception):
    """Bad configuration: the CLI prints it as one line and exits 2."""


def env_int(name: str, default: int, minimum: int = 0) -> int:
    """A whole number from the environment; a bad value is a ConfigError naming it."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


@dataclass(frozen=True)
class Settings:
    home: Path
    redis_url: str | None  # None: use the embedded server under `home`
    broker_url: str | None  # None: same as the Redis URL
    sink_url: str
    visibility_timeout_s: int
    ledger_ttl_s: int
    http_timeout_s: float
    prefetch_multiplier: int
    outage_limit_s: float  # `fanout run --wait` gives up after Redis is down this long
    limit_lease_s: float  # a concurrency slot of a dead worker comes back after this
    task_events: bool  # task events for Flower (on unless FANOUT_TASK_EVENTS=0)
    pipelines: tuple[str, ...]  # from FANOUT_PIPELINES, beside the built-in ones

    @property
    def pipeline_modules(self) -> tuple[str, ...]:
        return (*BUILTIN_PIPELINES, *(p for p in self.pipelines if p not in BUILTIN_PIPELINES))

    @classmethod
    def from_env(cls) -> Settings:
        home = Path(os.environ.get("FANOUT_HOME") or ".fanout").absolute()
        sink_url = os.environ.get("FANOUT_SINK_URL") or f"sqlite:///{home / 'fanout.db'}"
        extra = os.environ.get("FANOUT_PIPELINES", "")
        return cls(
            home=home,
            redis_url=os.environ.get("FANOUT_REDIS_URL") or None,
            broker_url=os.environ.get("FANOUT_BROKER_URL") or None,
            sink_url=sink_url,
            # Must exceed the longest task; a killed worker's messages come back after it.
            visibility_timeout_s=env_int("FANOUT_VISIBILITY_TIMEOUT_S", 300, minimum=1),
            ledger_ttl_s=env_int("FANOUT_LEDGER_TTL_S", 7 * 24 * 3600, minimum=60),
            http_timeout_s=_float("FANOUT_HTTP_TIMEOUT_S", 30.0),
            prefetch_multiplier=env_int("FANOUT_PREFETCH_MULTIPLIER", 4, minimum=1),
            outage_limit_s=_float("FANOUT_OUTAGE_LIMIT_S", 300.0),
            limit_lease_s=_float("FANOUT_LIMIT_LEASE_S", 30.0),
            task_events=env_int("FANOUT_TASK_EVENTS", 1) != 0,
            pipelines=tuple(p.strip() for p in extra.split(",") if p.strip()),
        )


def get_settings() -> Settings:
    return Settings.from_env()
