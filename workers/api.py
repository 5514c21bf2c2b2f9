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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from workers import keys
from workers.context import StageContext
from workers.hooks import Hook, StageResult
from workers.limits import per_key
from workers.looping import DEFAULT_MAX_ITERATIONS, Loop, LoopLimitExceeded, LoopState
from workers.options import OptionGroup
from workers.options import validate as validate_options
from workers.policy import cache_options, limit_options, retry
from workers.policy.retry import PermanentError, RetryPolicy, exponential
from workers.settings import ConfigError
from workers.sinks.base import Record
from workers.throttle import Throttled, rate_limit, rate_limit_async

__all__ = [
    "Hook",
    "Loop",
    "LoopLimitExceeded",
    "LoopState",
    "OptionGroup",
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
    "per_key",
    "rate_limit",
    "rate_limit_async",
]

StageFn = Callable[[StageContext, Any], Any]
RootsFn = Callable[[dict[str, Any]], Sequence[Any]]
ParamsFn = Callable[[dict[str, Any]], dict[str, Any]]

# Names end up in task names (PIPELINE.STAGE), queues (fanout.PIPELINE.STAGE) and item ids
# (STAGE:HASH): a dot or colon in one would make them ambiguous.
_NAME = re.compile(r"^[a-z0-9_]+$")
_PIPELINES: dict[str, Pipeline] = {}

#: The option groups of the built-in stage hooks, in the order the engine runs those hooks
#: (``engine/stage_hooks.py``): the cache, then the limits, then retries.
STAGE_OPTIONS: tuple[OptionGroup, ...] = (
    cache_options.OPTIONS, limit_options.OPTIONS, retry.OPTIONS,
)

#: ``Pipeline.stage``'s own keyword arguments: the engine's (fan-out, batching, looping).
_ENGINE_OPTIONS = ("maps_to", "claim_batch", "max_iterations", "hooks")


def _declared_by(hooks: Sequence[Hook]) -> list[OptionGroup]:
    """The option groups ``hooks`` declare, each once (one hook may be given twice)."""
    groups: list[OptionGroup] = []
    for hook in hooks:
        if hook.OPTIONS is not None and hook.OPTIONS not in groups:
            groups.append(hook.OPTIONS)
    return groups


def _valid_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{kind} name {name!r} must match [a-z0-9_]+")
    return name


@dataclass
class Stage:
    """One stage. ``max_iterations`` bounds a looping item; ``claim_batch=N`` lets each task
    of the stage also run up to N-1 more of its queued items (for many small leaves).
    ``options`` holds every other option, validated, with defaults filled in (``retries``,
    ``cache``, ``limits``...): each is owned by the hook that reads it (``workers.options``)."""

    pipeline: str
    name: str
    fn: StageFn
    maps_to: str | None = None
    max_iterations: int = DEFAULT_MAX_ITERATIONS
    claim_batch: int = 1
    hooks: tuple[Hook, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)  # read-only once registered

    @property
    def task_name(self) -> str:
        """The Celery task's name, ``PIPELINE.STAGE``."""
        return f"{self.pipeline}.{self.name}"

    @property
    def queue(self) -> str:
        """The stage's queue, ``fanout.PIPELINE.STAGE``."""
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
        claim_batch: int = 1,
        max_iterations: int = DEFAULT_MAX_ITERATIONS,
        hooks: Sequence[Hook] = (),
        **options: Any,
    ) -> Callable[[StageFn], StageFn]:
        """Register a stage. ``maps_to``, ``claim_batch`` and ``max_iterations`` are the
        engine's own; every other option belongs to a hook and is checked by it (an unknown
        one is a ConfigError, so a typo cannot pass silently):

        - retries (seed 004): ``retries`` more tries after ``retry_delay_s`` (seconds, a list
          by attempt, or ``exponential(base_s, factor, max_s)``), each delay varied by +/-
          ``retry_jitter`` (a fraction), only for ``retry_on`` exception types and when
          ``retry_if(exc)`` is true; a ``PermanentError`` (or a vendor 4xx) never retries;
        - ``limits=[NAME, ...]``: global limits each item goes through (``per_key(NAME,
          key_of)``: the item's key of the limit);
        - caching (seed 004): ``cache="inputs"`` or ``cache_key=fn(ctx, item)``, kept
          ``cache_ttl_s``; a run with ``refresh_cache=True`` in its params overwrites it;
        - the options a pipeline's or the stage's own hooks declare (``Hook.OPTIONS``).
        """
        label = f"{self.name}.{name}"
        declared = (*STAGE_OPTIONS, *_declared_by((*self.hooks, *hooks)))
        valid = validate_options(label, options, declared, engine=_ENGINE_OPTIONS)

        def register(fn: StageFn) -> StageFn:
            self.stages[name] = Stage(
                self.name, _valid_name("stage", name), fn, maps_to, max_iterations,
                max(1, claim_batch), tuple(hooks), MappingProxyType(valid),
            )
            return fn

        return register

    def hooks_of(self, stage: Stage) -> tuple[Hook, ...]:
        """The pipeline's hooks, then the stage's own (before the built-in ones)."""
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
    """The pipeline registered as ``name``; a ConfigError naming the known ones if none."""
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
    """Every pipeline the imported modules registered."""
    return list(_PIPELINES.values())
