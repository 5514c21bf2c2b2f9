"""Runtime knobs of the demo vendor.

One ``VendorConfig`` instance is shared by the CLI (initial values) and the
``/_admin/config`` endpoint (runtime changes).  All validation lives in
``VendorConfig.update`` so both paths reject the same bad values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

from .data import DEFAULT_METRICS


class ConfigError(ValueError):
    """A knob name or value was rejected."""


def _int(name: str, value: object, minimum: int | None = 0) -> int:
    # bool is an int subclass; "true" is never a sensible count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}")
    return value


def _float(name: str, value: object, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{name} must be a finite number >= 0")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{name} must be between 0 and {maximum:g}")
    return number


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false")
    return value


def _metrics(name: str, value: object) -> tuple[str, ...]:
    # Accept the CLI spelling ("a,b,c") as well as a JSON list.
    items: list[object]
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(f"{name} must be a list of names")
    if not items or not all(isinstance(item, str) and item for item in items):
        raise ConfigError(f"{name} must be a non-empty list of non-empty names")
    return tuple(str(item) for item in items)


def _fail_paths(name: str, value: object) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be an object of path -> count")
    result: dict[str, int] = {}
    for key, count in value.items():
        if not isinstance(key, str) or not key.startswith("/"):
            raise ConfigError(f"{name} keys must be paths starting with '/'")
        result[key] = _int(f"{name}[{key!r}]", count)
    return result


def _path_keys(name: str, value: object) -> tuple[str, ...]:
    # Same key format as fail_paths: the path, plus "?day=..." for metrics.
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name} must be a list of paths")
    for key in value:
        if not isinstance(key, str) or not key.startswith("/"):
            raise ConfigError(f"{name} must hold paths starting with '/'")
    return tuple(value)


def _burst(name: str, value: object) -> dict[str, float | str]:
    if not isinstance(value, dict) or not value.keys() <= {"count", "retry_after_s", "key"}:
        raise ConfigError(
            f'{name} must be an object {{"count": N, "retry_after_s": S[, "key": TOKEN]}}'
        )
    if "count" not in value:
        raise ConfigError(f"{name} needs a count")
    burst: dict[str, float | str] = {
        "count": _int(f"{name}.count", value["count"]),
        "retry_after_s": _float(f"{name}.retry_after_s", value.get("retry_after_s", 1.0)),
    }
    if "key" in value:  # only that API key's requests get the burst
        key = value["key"]
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{name}.key must be a non-empty string")
        burst["key"] = key
    return burst


_Validator = Callable[[str, object], object]

_VALIDATORS: dict[str, _Validator] = {
    "accounts": _int,
    "services": _int,
    "page_size": lambda n, v: _int(n, v, minimum=1),
    "seed": lambda n, v: _int(n, v, minimum=None),
    "metrics": _metrics,
    "latency_ms": _float,
    "error_rate": lambda n, v: _float(n, v, maximum=1.0),
    "error_times": _int,
    "rate_limit_rps": _float,
    "key_rate_limit_rps": _float,
    "rate_limit_headers": _bool,
    "account_tokens": _bool,
    "retry_after_integer": _bool,
    "stall_rate": lambda n, v: _float(n, v, maximum=1.0),
    "stall_ms": _float,
    "stall_paths": _path_keys,
    "report_polls": _int,
    "fail_paths": _fail_paths,
    "not_found_paths": _path_keys,
    "burst_429": _burst,
}

KNOBS: tuple[str, ...] = tuple(_VALIDATORS)


@dataclass
class VendorConfig:
    """Every knob of the demo vendor; mutable so admins can change it live."""

    accounts: int = 3
    services: int = 5
    page_size: int = 20
    seed: int = 7
    metrics: tuple[str, ...] = DEFAULT_METRICS
    latency_ms: float = 0.0
    error_rate: float = 0.0
    error_times: int = 0
    rate_limit_rps: float = 0.0
    # the same limit for each API key (``Authorization: Bearer <token>``; no token: key "-")
    key_rate_limit_rps: float = 0.0
    # off: a limit is unannounced (nothing but the 429 and its Retry-After); on: every answer
    # carries RateLimit-Limit/-Remaining/-Reset and X-RateLimit-Remaining/-Reset (delta seconds)
    rate_limit_headers: bool = False
    # the accounts listing gives each account its API token, "tok-<account id>"
    account_tokens: bool = False
    retry_after_integer: bool = False
    stall_rate: float = 0.0
    stall_ms: float = 30_000.0
    # path keys that always stall for stall_ms (on top of those stall_rate picks)
    stall_paths: tuple[str, ...] = ()
    report_polls: int = 3
    # path key -> remaining forced 500s; counts down as requests hit it.
    fail_paths: dict[str, int] = field(default_factory=dict)
    # path keys answered 404 {"error": "not found"} for as long as they are listed
    not_found_paths: tuple[str, ...] = ()
    # the next `count` non-admin requests (of API key `key` only, if given) get 429 +
    # Retry-After: retry_after_s; count goes down as they are sent, setting the knob again
    # starts a new burst.
    burst_429: dict[str, float | str] = field(
        default_factory=lambda: {"count": 0, "retry_after_s": 1.0}
    )

    def __post_init__(self) -> None:
        # Route constructor arguments through the same checks as updates.
        self.update(self.to_dict())

    def update(self, changes: Mapping[str, object]) -> None:
        """Validate every change first, then apply them all (or none)."""
        checked: dict[str, object] = {}
        for name, value in changes.items():
            if name not in _VALIDATORS:
                raise ConfigError(f"unknown knob {name!r}")
            checked[name] = _VALIDATORS[name](name, value)
        for name, value in checked.items():
            setattr(self, name, value)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready snapshot (tuples as lists, dicts copied)."""
        result: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            result[f.name] = value
        return result
