"""A stage's declared limits (``@flow.stage(..., limits=["github-api"])``) as a hook: each item
goes through each limit (a ``per_key`` one: through the item's key of it) before its stage
runs, holds a concurrency slot (if the limit has any) until it ends, and a vendor's
Retry-After pushes the limit (the key) back for everyone. An item of an async stage waits for
its turn on the event loop without blocking it (``Throttle.enter_async``)."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import redis

from workers.context import StageContext
from workers.hooks import Decision, Defer, Hook, StageResult
from workers.http import VendorHTTPError
from workers.limits import Lease, LimitRef, PerKey
from workers.policy.limit_options import OPTIONS
from workers.throttle import Throttle, Throttled, Turn, throttle

if TYPE_CHECKING:
    from workers.api import Stage

log = logging.getLogger("fanout.limits")

def for_stage(stage: Stage, client: redis.Redis) -> tuple[Hook, ...]:
    """One hook per limit the stage names (``policy/limit_options.py``; ``throttle()`` has
    its own Redis client)."""
    return tuple(LimitHook(limit, throttle()) for limit in OPTIONS.of(stage.options)["limits"])


class LimitHook(Hook):
    def __init__(self, limit: str | PerKey, throttle: Throttle) -> None:
        self.limit = limit
        self.throttle = throttle
        self._held: dict[str, Lease | Turn] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """The limit's name (a ``per_key`` one's template)."""
        return self.limit.name if isinstance(self.limit, PerKey) else self.limit

    def _ref(self, item: Any) -> LimitRef:
        """The limit this item goes through (a bad key: ValueError, the item fails)."""
        return self.limit.ref(item) if isinstance(self.limit, PerKey) else self.limit

    @staticmethod
    def _holder(ctx: StageContext) -> str:
        return f"{ctx.run_id}.{ctx.item_id}.{ctx.loop.iteration}"

    def before(self, ctx: StageContext, item: Any) -> Decision | None:
        try:
            lease = self.throttle.enter(self._ref(item), self._holder(ctx))
        except Throttled as held:
            return Defer(held.wait_s, held.reason)
        if lease is not None:
            with self._lock:
                self._held[self._holder(ctx)] = lease
        return None

    async def before_async(self, ctx: StageContext, item: Any) -> Decision | None:
        try:
            turn = await self.throttle.enter_async(self._ref(item), self._holder(ctx))
        except Throttled as held:
            return Defer(held.wait_s, held.reason)
        if turn.lease is not None or turn.gate is not None:
            with self._lock:
                self._held[self._holder(ctx)] = turn
        return None

    def _leave(self, ctx: StageContext) -> None:
        with self._lock:
            held = self._held.pop(self._holder(ctx), None)
        try:
            if isinstance(held, Turn):
                self.throttle.leave_turn(held)  # on the loop: one short Redis call
            else:
                self.throttle.leave(held)
        except Exception as exc:  # the lease expires by itself; the item's outcome stands
            log.warning("could not release a slot of limit %s: %s", self.limit, exc)

    def after(self, ctx: StageContext, item: Any, result: StageResult) -> None:
        self._leave(ctx)
        self.throttle.answered(self._ref(item))  # an auto limit's success

    def on_failure(
        self, ctx: StageContext, item: Any, exc: BaseException, *, final: bool
    ) -> None:
        self._leave(ctx)
        if isinstance(exc, VendorHTTPError) and exc.status in (429, 503):
            self.throttle.refused(self._ref(item), exc.retry_after_s)
