"""What pipeline authors import: ``Pipeline``, ``Stage``, ``StageContext``, ``Loop``, ``Record``.

A pipeline is a named chain of stages for one vendor, written as plain functions; each stage
handles ONE item. A stage declared with ``maps_to`` fans out the list it returns (one message
per element, Prefect's ``.map``); any stage may also call ``ctx.map(stage, items)``. A leaf
returns ``Record``s for the sink, or any JSON value. Tasks are named ``PIPELINE.STAGE``. Nothing
here knows Celery: the worker app registers one task per stage when it loads the pipelines.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from workers import keys
from workers.context import StageContext
from workers.hooks import Hook, StageResult
from workers.looping import DEFAULT_MAX_ITERATIONS, Loop, LoopLimitExceeded, LoopState
from workers.policy.retry import Delay, PermanentError, RetryIf, RetryPolicy, exponential
from workers.settings import ConfigError
from workers.sinks.base import Record
from workers.throttle import Throttled, rate_limit

__all__ = [
    "Hook",
    "Loop",
    "LoopLimitExceeded",
    "LoopState",
    "PermanentError",
    "Pipeline",
    "Record",
    "RetryPolicy",
    "Stage",
    "StageContext",
    "StageResult",
    "Throttled",
    "all_pipelines",
    "exponential",
    "find_stage",
    "get_pipeline",
    "load_pipelines",
    "rate_limit",
]

StageFn = Callable[[StageContext, Any], Any]
RootsFn = Callable[[dict[str, Any]], Sequence[Any]]
ParamsFn = Callable[[dict[str, Any]], dict[str, Any]]

# Names end up in task names (PIPELINE.STAGE), queues (fanout.PIPELINE.STAGE) and item ids
# (STAGE:HASH): a dot or colon in one would make them ambiguous.
_NAME = re.compile(r"^[a-z0-9_]+$")
_PIPELINES: dict[str, Pipeline] = {}


def _valid_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{kind} name {name!r} must match [a-z0-9_]+")
    return name


@dataclass
class Stage:
    """One stage. ``retry`` says when a failed item (one iteration, for a loop) is run again
    and after how long; ``max_iterations`` bounds a looping item; ``claim_batch=N`` lets each
    task of the stage also run up to N-1 more of its queued items (for many small leaves)."""

    pipeline: str
    name: str
    fn: StageFn
    maps_to: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_iterations: int = DEFAULT_MAX_ITERATIONS
    claim_batch: int = 1
    hooks: tuple[Hook, ...] = ()
    limits: tuple[str, ...] = ()  # global limits (``fanout limits set``) each item goes through
    cache: str | None = None  # "inputs": serve a repeat of the same inputs from the cache
    cache_key: Callable[[StageContext, Any], str] | None = None  # or a key of your own
    cache_ttl_s: float = 86_400.0

    @property
    def task_name(self) -> str:
        return f"{self.pipeline}.{self.name}"

    @property
    def queue(self) -> str:
        return keys.queue_name(self.pipeline, self.name)


@dataclass
class Pipeline:
    """A named chain of stages for one vendor. Register stages with the decorators."""

    name: str
    vendor: str = ""
    hooks: Sequence[Hook] = ()
    stages: dict[str, Stage] = field(default_factory=dict)
    root_stage: str | None = None
    list_roots: RootsFn | None = None
    check_params: ParamsFn | None = None

    def __post_init__(self) -> None:
        _valid_name("pipeline", self.name)
        self.vendor = self.vendor or self.name
        _PIPELINES[self.name] = self

    def roots(self, stage: str) -> Callable[[RootsFn], RootsFn]:
        """Decorate the producer function that lists the root items (run in the producer)."""

        def register(fn: RootsFn) -> RootsFn:
            self.root_stage, self.list_roots = stage, fn
            return fn

        return register

    def params(self, fn: ParamsFn) -> ParamsFn:
        """Decorate the function that validates and completes run parameters."""
        self.check_params = fn
        return fn

    def stage(
        self,
        name: str,
        *,
        maps_to: str | None = None,
        retries: int = 0,
        retry_delay_s: Delay = 1.0,
        retry_jitter: float = 0.0,
        retry_on: type[BaseException] | Sequence[type[BaseException]] = Exception,
        retry_if: RetryIf | None = None,
        max_iterations: int = DEFAULT_MAX_ITERATIONS,
        claim_batch: int = 1,
        hooks: Sequence[Hook] = (),
        limits: Sequence[str] = (),
        cache: str | None = None,
        cache_key: Callable[[StageContext, Any], str] | None = None,
        cache_ttl_s: float = 86_400.0,
    ) -> Callable[[StageFn], StageFn]:
        """Register a stage. Retries (seed 004): ``retries`` more tries after ``retry_delay_s``
        (seconds, a list by attempt, or ``exponential(base_s, factor, max_s)``), each delay
        varied by +/- ``retry_jitter`` (a fraction), only for ``retry_on`` exception types and
        when ``retry_if(exc)`` is true; a ``PermanentError`` (or a vendor 4xx) never retries.
        Caching (seed 004): ``cache="inputs"`` or ``cache_key=fn(ctx, item)``, kept
        ``cache_ttl_s``; a run with ``refresh_cache=True`` in its params overwrites it."""
        if cache not in (None, "inputs"):
            raise ConfigError(f"stage {self.name}.{name}: cache must be 'inputs', got {cache!r}")
        if not cache_ttl_s > 0:
            raise ConfigError(f"stage {self.name}.{name}: cache_ttl_s must be > 0")
        try:
            retry = RetryPolicy.from_options(
                retries=retries, retry_delay_s=retry_delay_s, retry_jitter=retry_jitter,
                retry_on=retry_on, retry_if=retry_if,
            )
        except ValueError as exc:
            raise ConfigError(f"stage {self.name}.{name}: {exc}") from None

        def register(fn: StageFn) -> StageFn:
            self.stages[name] = Stage(
                self.name, _valid_name("stage", name), fn, maps_to, retry, max_iterations,
                max(1, claim_batch), tuple(hooks), tuple(limits), cache, cache_key,
                float(cache_ttl_s),
            )
            return fn

        return register

    def hooks_of(self, stage: Stage) -> tuple[Hook, ...]:
        return (*self.hooks, *stage.hooks)

    def stage_order(self) -> list[str]:
        """Stages from the root down the ``maps_to`` chain, then any others."""
        order: list[str] = []
        current = self.root_stage
        while current and current in self.stages and current not in order:
            order.append(current)
            current = self.stages[current].maps_to
        return order + [s for s in self.stages if s not in order]


def load_pipelines(modules: Sequence[str]) -> None:
    """Import pipeline modules (each registers its pipelines); a module that fails to
    import is a ConfigError naming it."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ConfigError(f"cannot import pipeline module {module!r}: {exc}") from None


def get_pipeline(name: str) -> Pipeline:
    try:
        return _PIPELINES[name]
    except KeyError:
        known = ", ".join(sorted(_PIPELINES)) or "none"
        raise ConfigError(f"unknown pipeline {name!r} (known: {known})") from None


def find_stage(task_name: str) -> Stage | None:
    """The stage behind a task name ``PIPELINE.STAGE``, or None."""
    pipeline, _, stage = task_name.partition(".")
    found = _PIPELINES.get(pipeline)
    return found.stages.get(stage) if found else None


def all_pipelines() -> list[Pipeline]:
    return list(_PIPELINES.values())
