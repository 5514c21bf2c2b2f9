"""Kill switches for batch maps (DESIGN 4.3, seed 003): pure decisions on a run's counters.

A switch is one of ``AnyFailed()``, ``FailureCount(max_count)``, ``FailureRate(min_sample,
max_fail_rate)``, or any callable ``(Counts) -> bool``; ``check(switch, counts)`` takes any of
them and returns a ``Trip`` with a reason, or None. Switches travel in Redis with a batch map,
so each has a JSON spec (``to_spec`` / ``from_spec``); a callable travels as its import path
(``{"kind": "callable", "ref": "package.module:function"}``) and must be importable by workers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Counts:
    """Terminal items so far (of one stage, or of the batches of one map)."""

    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    cached: int = 0

    @property
    def finished(self) -> int:
        """Items that ended, whatever their outcome."""
        return self.succeeded + self.failed + self.skipped + self.cached


@dataclass(frozen=True)
class Trip:
    """A switch tripped: no further batch is enqueued and the run ends ``killed``."""

    reason: str


@runtime_checkable
class KillSwitch(Protocol):
    """What a switch class provides (a plain function of ``Counts`` works too)."""

    def check(self, counts: Counts) -> Trip | None:
        """A ``Trip`` when the switch trips at ``counts``, else None."""
        ...


@dataclass(frozen=True)
class AnyFailed:
    """Trips on the first failure (prefecto's ``AnyFailedSwitch``)."""

    def check(self, counts: Counts) -> Trip | None:
        return Trip(f"AnyFailed: {counts.failed} failed") if counts.failed else None


@dataclass(frozen=True)
class FailureCount:
    """Trips once ``max_count`` items have failed, counted over the whole map."""

    max_count: int

    def __post_init__(self) -> None:
        _require(_is_int(self.max_count) and self.max_count >= 1,
                 f"FailureCount max_count must be a whole number >= 1, got {self.max_count!r}")

    def check(self, counts: Counts) -> Trip | None:
        if counts.failed >= self.max_count:
            return Trip(f"FailureCount: {counts.failed} failed >= {self.max_count}")
        return None


@dataclass(frozen=True)
class FailureRate:
    """Trips when at least ``min_sample`` items are finished and more than ``max_fail_rate``
    of them failed."""

    min_sample: int
    max_fail_rate: float

    def __post_init__(self) -> None:
        _require(_is_int(self.min_sample) and self.min_sample >= 1,
                 f"FailureRate min_sample must be a whole number >= 1, got {self.min_sample!r}")
        rate = self.max_fail_rate
        _require(isinstance(rate, int | float) and not isinstance(rate, bool) and 0 <= rate < 1,
                 f"FailureRate max_fail_rate must be a fraction in [0, 1), got {rate!r}")

    def check(self, counts: Counts) -> Trip | None:
        finished = counts.finished
        if finished < self.min_sample or counts.failed <= self.max_fail_rate * finished:
            return None
        return Trip(
            f"FailureRate: {counts.failed}/{finished} failed = {counts.failed / finished:.3g} "
            f"> {self.max_fail_rate:g}"
        )


Switch = KillSwitch | Callable[[Counts], bool]


def check(switch: Switch | None, counts: Counts) -> Trip | None:
    """Ask any switch (a class above, a callable, or None for no switch) about ``counts``."""
    if switch is None:
        return None
    if isinstance(switch, KillSwitch):
        return switch.check(counts)
    if switch(counts):
        return Trip(f"{_name(switch)}: tripped at {counts}")
    return None


def to_spec(switch: Switch) -> dict[str, Any]:
    """The JSON form of a switch. A callable must be a module-level function or class."""
    if isinstance(switch, AnyFailed):
        return {"kind": "any_failed"}
    if isinstance(switch, FailureCount):
        return {"kind": "failure_count", "max_count": switch.max_count}
    if isinstance(switch, FailureRate):
        return {"kind": "failure_rate", "min_sample": switch.min_sample,
                "max_fail_rate": switch.max_fail_rate}
    ref = f"{getattr(switch, '__module__', '')}:{getattr(switch, '__qualname__', '')}"
    try:
        importable = _resolve(ref) is switch
    except ValueError:
        importable = False
    _require(importable, f"kill switch {switch!r} cannot travel to workers: use AnyFailed, "
             "FailureCount, FailureRate or a module-level function")
    return {"kind": "callable", "ref": ref}


def from_spec(spec: Mapping[str, Any]) -> Switch:
    """The switch a ``to_spec`` dict describes; ValueError for anything else."""
    kind = spec.get("kind") if isinstance(spec, Mapping) else None
    try:
        if kind == "any_failed":
            return AnyFailed()
        if kind == "failure_count":
            return FailureCount(spec["max_count"])
        if kind == "failure_rate":
            return FailureRate(spec["min_sample"], spec["max_fail_rate"])
        if kind == "callable":
            switch = _resolve(str(spec["ref"]))
            _require(callable(switch), f"kill switch {spec['ref']!r} is not callable")
            return switch
    except KeyError as exc:
        raise ValueError(f"kill switch spec {dict(spec)!r} lacks {exc.args[0]!r}") from None
    raise ValueError(
        f"unknown kill switch spec {spec!r}: kind must be one of any_failed, failure_count, "
        "failure_rate, callable"
    )


#: The text form of a switch, for the CLI and the config file (``parse``).
TEXT_FORMS = ("any_failed", "failure_count:MAX", "failure_rate:MIN_SAMPLE:MAX_RATE",
              "package.module:function")


def parse(text: str) -> Switch:
    """A switch from its text form: ``any_failed``, ``failure_count:3`` (trips at 3 failed
    items), ``failure_rate:10:0.2`` (trips once 10 have ended and more than 20% failed), or
    ``package.module:function`` (a callable workers can import). ValueError otherwise."""
    kind, _, rest = text.strip().partition(":")
    expected = f"kill switch {text!r}: expected one of {', '.join(TEXT_FORMS)}"
    if kind == "any_failed":
        _require(not rest, expected)
        return AnyFailed()
    if kind == "failure_count":
        _require(rest.isdigit(), f"kill switch {text!r}: failure_count:MAX takes a whole number")
        return FailureCount(int(rest))
    if kind == "failure_rate":
        min_sample, _, max_rate = rest.partition(":")
        try:
            return FailureRate(int(min_sample), float(max_rate))
        except ValueError:
            raise ValueError(f"kill switch {text!r}: failure_rate:MIN_SAMPLE:MAX_RATE takes a "
                             "whole number and a rate between 0 and 1") from None
    _require(bool(rest) and all(part.isidentifier() for part in kind.split(".")), expected)
    return from_spec({"kind": "callable", "ref": text.strip()})


def _resolve(ref: str) -> Any:
    module, _, qualname = ref.partition(":")
    try:
        target: Any = importlib.import_module(module)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"kill switch {ref!r} cannot be imported") from None
    return target


def _name(switch: Callable[[Counts], bool]) -> str:
    return getattr(switch, "__qualname__", None) or type(switch).__name__


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
