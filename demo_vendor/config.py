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
    "retry_after_integer": _bool,
    "stall_rate": lambda n, v: _float(n, v, maximum=1.0),
    "stall_ms": _float,
    "report_polls": _int,
    "fail_paths": _fail_paths,
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
    retry_after_integer: bool = False
    stall_rate: float = 0.0
    stall_ms: float = 30_000.0
    report_polls: int = 3
    # path key -> remaining forced 500s; counts down as requests hit it.
    fail_paths: dict[str, int] = field(default_factory=dict)

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
        """JSON-ready snapshot (metrics as a list, fail_paths copied)."""
        result: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            result[f.name] = value
        return result
