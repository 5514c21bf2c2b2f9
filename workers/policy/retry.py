"""Task-level retry policy (DESIGN 4.4, seed 004): which errors to retry, how often, how long
to wait in between.

Attempts count from 1, the first try. When try ``attempt`` fails, ``should_retry(exc, attempt)``
says whether try ``attempt + 1`` happens, and ``delay_for(attempt)`` how long to wait before it.
So ``retries=3`` means at most four tries, and with ``delay_s=[1, 10, 100]`` the waits are
1, 10, 100 s (a longer list than ``retries`` is fine; a shorter one repeats its last element).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from workers.options import OptionGroup, import_ref

RetryIf = Callable[[BaseException], bool]


class PermanentError(Exception):
    """Raise this (or any exception with a true ``permanent`` attribute, like a vendor's 404)
    from a stage: the item fails at once, whatever its retry policy."""

    permanent = True


def is_permanent(exc: BaseException) -> bool:
    return bool(getattr(exc, "permanent", False))


class RetryAfter(Exception):
    """An error that says how long to wait before the next try (a vendor's Retry-After):
    the task's retry waits at least ``retry_after_s`` (None: it did not say)."""

    retry_after_s: float | None = None


def retry_after_s(exc: BaseException) -> float | None:
    """The wait ``exc`` asks for before the next try, if it is a ``RetryAfter`` that says."""
    return exc.retry_after_s if isinstance(exc, RetryAfter) else None


Rand = Callable[[], float]


@dataclass(frozen=True)
class Exponential:
    """``base_s * factor ** (attempt - 1)``, never more than ``max_s``."""

    base_s: float
    factor: float = 2.0
    max_s: float = 3600.0

    def __post_init__(self) -> None:
        _seconds(self.base_s, "exponential base_s")
        _seconds(self.max_s, "exponential max_s")
        if not (_is_number(self.factor) and math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"exponential factor must be a number >= 1, got {self.factor!r}")

    def delay_s(self, attempt: int) -> float:
        try:
            raw_s = self.base_s * self.factor ** (attempt - 1)
        except OverflowError:
            raw_s = math.inf
        return float(min(raw_s, self.max_s))


def exponential(base_s: float, factor: float = 2.0, max_s: float = 3600.0) -> Exponential:
    """An exponential retry delay: ``base_s``, ``base_s * factor``, ... capped at ``max_s``."""
    return Exponential(base_s, factor, max_s)


Delay = float | Sequence[float] | Exponential


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry and how long to wait. A list ``delay_s`` is stored as a tuple.

    ``jitter`` is a fraction: each delay is multiplied by a factor drawn uniformly from
    ``[1 - jitter, 1 + jitter]``, so workers that failed together do not retry together.
    The cap of an exponential delay applies before the jitter, so delays at the cap still
    spread out instead of all landing on ``max_s``.
    """

    retries: int = 0
    delay_s: Delay = 1.0
    jitter: float = 0.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    retry_if: RetryIf | None = None

    def __post_init__(self) -> None:
        _check_retries(self.retries, "retries")
        object.__setattr__(self, "delay_s", _check_delay(self.delay_s, "delay_s"))
        _check_jitter(self.jitter, "jitter")
        object.__setattr__(self, "retry_on", _check_retry_on(self.retry_on, "retry_on"))
        _check_retry_if(self.retry_if, "retry_if")

    @classmethod
    def from_options(
        cls,
        *,
        retries: int = 0,
        retry_delay_s: Delay = 1.0,
        retry_jitter: float = 0.0,
        retry_on: type[BaseException] | Sequence[type[BaseException]] = Exception,
        retry_if: RetryIf | None = None,
    ) -> RetryPolicy:
        """Build a policy from a stage's options; bad input raises ValueError naming the option."""
        _check_retries(retries, "retries")
        delay = _check_delay(retry_delay_s, "retry_delay_s")
        _check_jitter(retry_jitter, "retry_jitter")
        types = (retry_on,) if isinstance(retry_on, type) else retry_on
        on = _check_retry_on(types, "retry_on")
        _check_retry_if(retry_if, "retry_if")
        return cls(retries, delay, retry_jitter, on, retry_if)

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """Whether try ``attempt`` (1 = the first), which raised ``exc``, gets another try. A
        permanent error (``is_permanent``) never does."""
        _check_attempt(attempt)
        if attempt > self.retries or is_permanent(exc) or not isinstance(exc, self.retry_on):
            return False
        return self.retry_if is None or bool(self.retry_if(exc))

    def delay_for(self, attempt: int, rand: Rand = random.random) -> float:
        """Seconds to wait after try ``attempt`` failed; ``rand`` draws from [0, 1)."""
        _check_attempt(attempt)
        base_s = self._base_delay_s(attempt)
        if not self.jitter:
            return base_s
        return base_s * (1 - self.jitter + 2 * self.jitter * rand())

    def _base_delay_s(self, attempt: int) -> float:
        if isinstance(self.delay_s, int | float):
            return float(self.delay_s)
        if isinstance(self.delay_s, Exponential):
            return self.delay_s.delay_s(attempt)
        return float(self.delay_s[min(attempt, len(self.delay_s)) - 1])


def _check_options(options: Mapping[str, Any]) -> None:
    RetryPolicy.from_options(**options)


_EXPONENTIAL_KEYS = ("base_s", "factor", "max_s")


def _delay_from_config(value: Any) -> Any:
    """``retry_delay_s`` in the config file: seconds, a list, or a table that is
    ``exponential(base_s, factor, max_s)``."""
    if not isinstance(value, dict):
        return value
    for key in value:
        if key not in _EXPONENTIAL_KEYS:
            raise ValueError(f"retry_delay_s: unknown key {key!r} of an exponential delay "
                             f"(known: {', '.join(_EXPONENTIAL_KEYS)})")
    if "base_s" not in value:
        raise ValueError(f"retry_delay_s: an exponential delay needs base_s, got {value!r}")
    return exponential(**value)


def _types_from_config(value: Any) -> tuple[Any, ...]:
    """``retry_on`` in the config file: exception types by name (``ValueError``) or import
    path (``httpx:TransportError``), one or a list."""
    names = value if isinstance(value, list) else [value]
    return tuple(import_ref(name, "retry_on", builtin=True) for name in names)


#: The stage options of retries (``engine/retry_hook.py`` reads them).
OPTIONS = OptionGroup(
    "retry",
    {"retries": 0, "retry_delay_s": 1.0, "retry_jitter": 0.0, "retry_on": Exception,
     "retry_if": None},
    _check_options,
    from_config={"retry_delay_s": _delay_from_config, "retry_on": _types_from_config,
                 "retry_if": lambda ref: import_ref(ref, "retry_if")},
)


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _seconds(value: object, label: str) -> float:
    if not (_is_number(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{label} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _check_retries(value: object, label: str) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"{label} must be a whole number >= 0, got {value!r}")


def _check_delay(value: object, label: str) -> float | tuple[float, ...] | Exponential:
    if isinstance(value, Exponential):
        return value
    if isinstance(value, list | tuple):
        if not value:
            raise ValueError(f"{label} is an empty list: give at least one delay")
        return tuple(_seconds(element, f"each {label}") for element in value)
    return _seconds(value, label)


def _check_jitter(value: object, label: str) -> None:
    if not (_is_number(value) and 0 <= value <= 1):
        raise ValueError(f"{label} must be a fraction in [0, 1], got {value!r}")


def _check_retry_on(value: object, label: str) -> tuple[type[BaseException], ...]:
    types = tuple(value) if isinstance(value, list | tuple) else ()
    if not types or not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
        raise ValueError(f"{label} must be one or more exception types, got {value!r}")
    return types


def _check_retry_if(value: object, label: str) -> None:
    if value is not None and not callable(value):
        raise ValueError(f"{label} must be a callable taking the exception, got {value!r}")


def _check_attempt(attempt: int) -> None:
    if attempt < 1:
        raise ValueError(f"attempt counts from 1 (the first try), got {attempt}")
