"""Configuration from FANOUT_* environment variables, read once at the boundary.

Units live in the names (``_s``, ``_ms``) so nobody has to guess.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from workers.redact import redact

#: Pipelines every worker and producer loads; FANOUT_PIPELINES=module,module adds more.
BUILTIN_PIPELINES = ("workers.pipelines.demo",)
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
SINK_SCHEMES = ("sqlite:///", "postgresql://", "postgres://")  # what workers.sinks opens


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


def env_float(name: str, default: float, *, above: float | None = None,
              minimum: float | None = None) -> float:
    """A finite number from the environment, ``> above`` or ``>= minimum``; a bad value is a
    ConfigError naming it (0 s timeouts and leases only failed later, deep in a socket)."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {raw!r}")
    if above is not None and value <= above:
        raise ConfigError(f"{name} must be > {above:g}, got {raw!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum:g}, got {raw!r}")
    return value


def env_flag(name: str, default: bool) -> bool:
    """``1`` (on) or ``0`` (off); anything else is a ConfigError naming it."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw not in ("0", "1"):
        raise ConfigError(f"{name} must be 0 or 1, got {raw!r}")
    return raw == "1"


def env_url(name: str, schemes: tuple[str, ...] = ()) -> str | None:
    """A URL with one of ``schemes`` (e.g. ``redis://``; any ``SCHEME://`` when none are
    given), or None when unset. The error shows it with its password as ***."""
    raw = os.environ.get(name) or None
    if raw is not None and not (raw.startswith(schemes) if schemes else "://" in raw):
        expected = " or ".join(schemes) or "SCHEME://"
        raise ConfigError(f"{name} must start with {expected}, got {redact(raw)!r}")
    return raw


def _pipelines(name: str) -> tuple[str, ...]:
    modules = tuple(p.strip() for p in os.environ.get(name, "").split(",") if p.strip())
    for module in modules:
        if not all(part.isidentifier() for part in module.split(".")):
            raise ConfigError(f"{name} must be module names separated by commas, "
                              f"got {module!r}")
    return modules


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
        """Every setting from the environment, each checked (a bad one: ConfigError)."""
        home = Path(os.environ.get("FANOUT_HOME") or ".fanout").absolute()
        sink_url = os.environ.get("FANOUT_SINK_URL") or f"sqlite:///{home / 'fanout.db'}"
        if not sink_url.startswith(SINK_SCHEMES):  # the words of sinks.check_sink_url
            raise ConfigError(f"unsupported FANOUT_SINK_URL {redact(sink_url)!r} (expected "
                              "sqlite:///PATH or postgresql://...)")
        return cls(
            home=home,
            redis_url=env_url("FANOUT_REDIS_URL", REDIS_SCHEMES),
            broker_url=env_url("FANOUT_BROKER_URL"),  # any broker Celery serves
            sink_url=sink_url,
            # kombu's fallback on a Redis broker: live workers renew their leases (liveness.py).
            visibility_timeout_s=env_int("FANOUT_VISIBILITY_TIMEOUT_S", 300, minimum=1),
            ledger_ttl_s=env_int("FANOUT_LEDGER_TTL_S", 7 * 24 * 3600, minimum=60),
            http_timeout_s=env_float("FANOUT_HTTP_TIMEOUT_S", 30.0, above=0),
            # 1, as Celery advises for long tasks: a task carrying a claimed batch is long,
            # and a message prefetched behind it would wait for it (a small run's next hop
            # waits behind a backfill's batches). Claims, not prefetch, keep threads fed.
            prefetch_multiplier=env_int("FANOUT_PREFETCH_MULTIPLIER", 1, minimum=1),
            outage_limit_s=env_float("FANOUT_OUTAGE_LIMIT_S", 300.0, minimum=0),
            limit_lease_s=env_float("FANOUT_LIMIT_LEASE_S", 30.0, above=0),
            task_events=env_flag("FANOUT_TASK_EVENTS", True),
            pipelines=_pipelines("FANOUT_PIPELINES"),
        )


def get_settings() -> Settings:
    return Settings.from_env()


def validate_environment() -> Settings:
    """The settings, checked once where a process starts (the CLI, the Celery app): each
    variable, and that ``FANOUT_HOME`` can be created and written (the embedded Redis, the
    default sink and the logs live there). A bad one is a ConfigError of one line."""
    settings = get_settings()
    check_home(settings.home)
    env_url("FANOUT_DEMO_VENDOR_URL", ("http://", "https://"))  # read by the demo pipeline
    return settings


def check_home(home: Path) -> None:
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=home):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"FANOUT_HOME {str(home)!r} cannot be created or written: "
                          f"{reason}") from None
