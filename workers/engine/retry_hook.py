"""Task-level retries (seed 004) as a hook: a stage's ``retries``, ``retry_delay_s``,
``retry_jitter``, ``retry_on`` and ``retry_if`` (declared in ``policy/retry.py``) decide whether
a failed item (one iteration, for a loop) is tried again, and after how long. The wait is never
shorter than the vendor asked for (a 429's or 503's ``Retry-After``); a permanent error and an
item that looped past ``max_iterations`` are never retried."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import redis

from workers.context import StageContext
from workers.hooks import Hook, Retry
from workers.looping import LoopLimitExceeded
from workers.policy.retry import OPTIONS, RetryPolicy, retry_after_s

if TYPE_CHECKING:
    from workers.api import Stage

log = logging.getLogger("fanout")


def for_stage(stage: Stage, client: redis.Redis) -> tuple[Hook, ...]:
    """The stage's retry policy, if it retries at all."""
    policy = RetryPolicy.from_options(**OPTIONS.of(stage.options))
    return (RetryHook(policy),) if policy.retries else ()


class RetryHook(Hook):
    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    def retry(self, ctx: StageContext, item: Any, exc: BaseException) -> Retry | None:
        if isinstance(exc, LoopLimitExceeded) or not self._should_retry(ctx, exc):
            return None
        # Never sooner than the vendor asked (a 429's or 503's Retry-After).
        return Retry(max(self.policy.delay_for(ctx.attempt), retry_after_s(exc) or 0.0))

    def _should_retry(self, ctx: StageContext, exc: BaseException) -> bool:
        """The policy's answer; a ``retry_if`` that raises is logged and means no retry."""
        try:
            return self.policy.should_retry(exc, ctx.attempt)
        except Exception:
            log.error("%s %s: retry_if raised (no retry)", ctx.task_name, ctx.item_id,
                      exc_info=True)
            return False
