"""Pipelines: named chains of stages whose functions fanout turns into Celery tasks.

A stage handles ONE item. A stage declared with ``maps_to`` fans out: the list it returns
becomes one message per element for that stage (Prefect's ``.map``). A stage without it is a
leaf: the records it returns go to the sink. Tasks are named ``PIPELINE.STAGE`` and carry
``(run_id, item_id, item)``, so Flower shows the run of every task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workers import keys
from workers.looping import DEFAULT_MAX_ITERATIONS

if TYPE_CHECKING:
    from celery import Task

    from workers.runtime import StageContext

StageFn = Callable[["StageContext", Any], Any]
RootsFn = Callable[[dict[str, Any]], Sequence[Any]]
ParamsFn = Callable[[dict[str, Any]], dict[str, Any]]

_PIPELINES: dict[str, Pipeline] = {}


@dataclass
class Stage:
    """One stage. ``retries`` re-run a failed item (one iteration, for a loop) after
    ``retry_delay_s`` (a number, or a list indexed by attempt); ``max_iterations`` bounds a
    looping item."""

    pipeline: str
    name: str
    fn: StageFn
    maps_to: str | None = None
    retries: int = 0
    retry_delay_s: float | Sequence[float] = 1.0
    max_iterations: int = DEFAULT_MAX_ITERATIONS
    batch: int = 1
    task: Task | None = None

    def retry_delay_for(self, attempt: int) -> float:
        """Delay before attempt ``attempt + 1``."""
        if isinstance(self.retry_delay_s, int | float):
            return float(self.retry_delay_s)
        delays = list(self.retry_delay_s)
        return float(delays[min(attempt - 1, len(delays) - 1)]) if delays else 0.0

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
    stages: dict[str, Stage] = field(default_factory=dict)
    root_stage: str | None = None
    list_roots: RootsFn | None = None
    check_params: ParamsFn | None = None

    def __post_init__(self) -> None:
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
        retry_delay_s: float | Sequence[float] = 1.0,
        max_iterations: int = DEFAULT_MAX_ITERATIONS,
        batch: int = 1,
    ) -> Callable[[StageFn], StageFn]:
        """``batch=N``: each task of this stage also runs up to N-1 more of its queued
        items (``claiming.py``); worth it for many small leaf items."""

        def register(fn: StageFn) -> StageFn:
            from workers.runtime import make_task

            stage = Stage(self.name, name, fn, maps_to, retries, retry_delay_s, max_iterations,
                          batch)
            stage.task = make_task(stage)
            self.stages[name] = stage
            return fn

        return register

    def stage_order(self) -> list[str]:
        """Stages from the root down the ``maps_to`` chain, then any others."""
        order: list[str] = []
        current = self.root_stage
        while current and current in self.stages and current not in order:
            order.append(current)
            current = self.stages[current].maps_to
        return order + [s for s in self.stages if s not in order]


def get_pipeline(name: str) -> Pipeline:
    import workers.app  # noqa: F401  (imports every configured pipeline)

    try:
        return _PIPELINES[name]
    except KeyError:
        known = ", ".join(sorted(_PIPELINES)) or "none"
        from workers.settings import ConfigError

        raise ConfigError(f"unknown pipeline {name!r} (known: {known})") from None


def find_stage(task_name: str) -> Stage:
    """The stage behind a task name ``PIPELINE.STAGE``."""
    pipeline, _, stage = task_name.partition(".")
    return get_pipeline(pipeline).stages[stage]


def all_pipelines() -> list[Pipeline]:
    return list(_PIPELINES.values())
