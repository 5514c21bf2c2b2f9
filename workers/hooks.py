"""Hook points around a stage call, the same for single and claimed-batch deliveries.

A ``Hook`` may act before the call (skip the item, serve it from elsewhere, defer it), after
it (record, trip a switch), and on a failure (ask for another try: ``retry`` returns
``Retry(delay_s)``; ``on_failure`` hears whether the failure is final), in the spirit of
Dramatiq's middleware. A hook may declare the stage options it reads (``Hook.OPTIONS``, see
``workers.options``): ``Pipeline.stage`` then accepts and checks them, and keeps them in
``Stage.options``. A pipeline lists its hooks (``Pipeline(hooks=...)``) and a stage may add
its own; after those the engine adds the hooks a stage's own options ask for, in this order
(``engine/stage_hooks.py``): the cache (``cache=``), the limits (``limits=``), the retry
policy (``retries=``...). What a stage produced is a ``StageResult``: the engine fans it out
the same way whether the stage ran, a hook served it, or a replay brought it back.

Hooks are isolated as Dramatiq's middleware are (``HookCalls``). ``before`` runs in order
until one decides; one that raises is the item's error, as if its stage had raised. On an
error every hook's ``retry`` is asked in order until one asks for a retry (none: the failure
is final); one that raises is logged and passed over. ``after`` and ``on_failure`` run only on
the hooks whose ``before`` returned, in reverse order; one that raises is logged with its
traceback, the others still run, and the item's outcome stands (a raising ``after`` does not
fail an item whose call succeeded).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from workers.context import StageContext
from workers.looping import Loop
from workers.options import OptionGroup
from workers.sinks.base import Record

log = logging.getLogger("fanout.hooks")


@dataclass
class StageResult:
    """What one item of a stage produced."""

    children: dict[str, list[Any]] = field(default_factory=dict)  # stage -> items to map
    records: list[Record] = field(default_factory=list)  # for the sink
    value: Any = None  # any other JSON value (kept for ``RunView.results``)
    next_loop: Loop | None = None  # run the item again
    batch_maps: list[dict[str, Any]] = field(default_factory=list)  # ``ctx.batch_map`` asks

    def to_json(self) -> dict[str, Any]:
        loop = self.next_loop
        return {
            "children": self.children,
            "records": [r.__dict__ for r in self.records],
            "value": self.value,
            "loop": None if loop is None else {"payload": loop.payload, "delay_s": loop.delay_s},
            "batch_maps": self.batch_maps,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageResult:
        loop = data.get("loop")
        return cls(
            children={k: list(v) for k, v in (data.get("children") or {}).items()},
            records=[Record(**r) for r in data.get("records") or []],
            value=data.get("value"),
            next_loop=None if loop is None else Loop(loop["payload"], loop["delay_s"]),
            batch_maps=list(data.get("batch_maps") or []),
        )


@dataclass(frozen=True)
class Skip:
    """Do not run the item: it ends ``skipped``."""

    reason: str


@dataclass(frozen=True)
class Serve:
    """Do not run the item: use this result instead; it ends ``cached`` and still fans out."""

    result: StageResult


@dataclass(frozen=True)
class Defer:
    """Do not run the item now: run it again after ``delay_s``, counted ``throttled``."""

    delay_s: float
    reason: str


Decision = Skip | Serve | Defer


@dataclass(frozen=True)
class Retry:
    """Run the failed item again after ``delay_s``, counted ``retried``."""

    delay_s: float

    def __post_init__(self) -> None:
        if not (isinstance(self.delay_s, int | float) and 0 <= self.delay_s < math.inf):
            raise ValueError(f"Retry delay_s must be seconds >= 0, got {self.delay_s!r}")


class Hook:
    """Override what you need; every method defaults to doing nothing.

    ``OPTIONS`` declares the stage options this hook reads (``workers.options``): a stage
    given this hook (or of a pipeline given it) accepts them, checked, and keeps them in
    ``Stage.options``."""

    OPTIONS: ClassVar[OptionGroup | None] = None

    def before(self, ctx: StageContext, item: Any) -> Decision | None:
        """Called before the stage function; a decision replaces the call."""
        return None

    async def before_async(self, ctx: StageContext, item: Any) -> Decision | None:
        """``before`` for an item of an ``async def`` stage, on the worker's event loop.
        By default it calls ``before``; a hook that may wait (for a limit) overrides it, so
        the loop's other items go on meanwhile."""
        return self.before(ctx, item)

    def after(self, ctx: StageContext, item: Any, result: StageResult) -> None:
        """Called after the stage function returned (not for a served or skipped item)."""

    def retry(self, ctx: StageContext, item: Any, exc: BaseException) -> Retry | None:
        """Called when the stage function raised: ``Retry(delay_s)`` asks for another try;
        None leaves the decision to the next hook."""
        return None

    def on_failure(
        self, ctx: StageContext, item: Any, exc: BaseException, *, final: bool
    ) -> None:
        """Called when the stage function raised; ``final`` when no retry follows."""


class HookCalls:
    """The hooks of one item, called in turn (see the module docstring)."""

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.hooks = hooks
        self.entered: list[Hook] = []  # those whose before() returned

    def before(self, ctx: StageContext, item: Any) -> Decision | None:
        for hook in self.hooks:
            decision = hook.before(ctx, item)  # raising: the item's error
            self.entered.append(hook)
            if decision is not None:
                return decision
        return None

    async def before_async(self, ctx: StageContext, item: Any) -> Decision | None:
        """``before`` for an async stage's item (each hook's ``before_async``)."""
        for hook in self.hooks:
            decision = await hook.before_async(ctx, item)  # raising: the item's error
            self.entered.append(hook)
            if decision is not None:
                return decision
        return None

    def retry(self, ctx: StageContext, item: Any, exc: BaseException) -> Retry | None:
        """The first hook's ``Retry``, asking every hook in order (a ``before`` that raised
        is retried like the stage); None: the failure is final."""
        for hook in self.hooks:
            try:
                decision = hook.retry(ctx, item, exc)
            except Exception:
                _log_raised(hook, "retry", ctx)
                continue
            if decision is not None:
                return decision
        return None

    def after(self, ctx: StageContext, item: Any, result: StageResult) -> None:
        for hook in reversed(self.entered):
            try:
                hook.after(ctx, item, result)
            except Exception:
                _log_raised(hook, "after", ctx)

    def on_failure(
        self, ctx: StageContext, item: Any, exc: BaseException, *, final: bool
    ) -> None:
        for hook in reversed(self.entered):
            try:
                hook.on_failure(ctx, item, exc, final=final)
            except Exception:
                _log_raised(hook, "on_failure", ctx)


def _log_raised(hook: Hook, method: str, ctx: StageContext) -> None:
    log.error("%s %s: hook %s.%s() raised (the item's outcome stands)", ctx.task_name,
              ctx.item_id, type(hook).__name__, method, exc_info=True)
