"""A pipeline with hooks, for the tests; workers import this module (FANOUT_PIPELINES).

``numbers`` fans out 0..N-1 to ``fetch`` (one vendor call each). Three hooks, in order:
- ``DeferOnce`` defers item 4 once per run (counted ``throttled``, then it runs);
- ``SkipThree`` skips item 3 (counted ``skipped``, no vendor call);
- ``RedisMemo`` serves any item whose result it has kept (counted ``cached``); a served
  ``numbers`` item still fans out its children.

``hookretry.flaky`` item n raises ``Busy`` on its first n - 1 tries. Its pipeline's hook
``RetryBusy`` declares a stage option of its own, ``busy_retry_s``, and asks for another try
(``Hook.retry``) after that many seconds, twice at most; the stage has no ``retries``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import redis

from workers.api import Hook, OptionGroup, Pipeline, StageContext, StageResult, find_stage
from workers.hooks import Decision, Defer, Retry, Serve, Skip
from workers.http import request_json
from workers.ids import canonical_json


def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["FANOUT_REDIS_URL"], decode_responses=True)


class DeferOnce(Hook):
    def before(self, ctx: StageContext, item: Any) -> Decision | None:
        if ctx.stage == "fetch" and item == 4:
            first = _redis().set(f"hooktest:deferred:{ctx.run_id}", 1, nx=True, ex=600)
            if first:
                return Defer(0.2, "vendor busy")
        return None


class SkipThree(Hook):
    def before(self, ctx: StageContext, item: Any) -> Decision | None:
        return Skip("three is skipped") if ctx.stage == "fetch" and item == 3 else None


class RedisMemo(Hook):
    def _key(self, ctx: StageContext, item: Any) -> str:
        return f"hooktest:memo:{ctx.stage}:{canonical_json(item)}"

    def before(self, ctx: StageContext, item: Any) -> Decision | None:
        kept = _redis().get(self._key(ctx, item))
        return Serve(StageResult.from_json(json.loads(kept))) if kept else None

    def after(self, ctx: StageContext, item: Any, result: StageResult) -> None:
        _redis().set(self._key(ctx, item), json.dumps(result.to_json()), ex=600)


hooktest = Pipeline("hooktest", hooks=[DeferOnce(), SkipThree(), RedisMemo()])


@hooktest.stage("numbers", maps_to="fetch")
def numbers(ctx: StageContext, n: int) -> list[int]:
    return list(range(n))


@hooktest.stage("fetch", claim_batch=4)
def fetch(ctx: StageContext, n: int) -> int:
    return int(request_json("GET", f"{ctx.params['vendor_url']}/fib/{n + 1}", retries=0)["value"])


class Busy(Exception):
    pass


def _check_busy(options: Mapping[str, Any]) -> None:
    delay_s = options["busy_retry_s"]
    if delay_s is not None and not (isinstance(delay_s, int | float) and delay_s >= 0):
        raise ValueError(f"busy_retry_s must be seconds >= 0, got {delay_s!r}")


class RetryBusy(Hook):
    OPTIONS = OptionGroup("busy", {"busy_retry_s": None}, _check_busy)

    def retry(self, ctx: StageContext, item: Any, exc: BaseException) -> Retry | None:
        stage = find_stage(ctx.task_name)
        delay_s = stage.options["busy_retry_s"] if stage else None
        if isinstance(exc, Busy) and delay_s is not None and ctx.attempt <= 2:
            return Retry(delay_s)
        return None


hookretry = Pipeline("hookretry", hooks=[RetryBusy()])


@hookretry.stage("flaky", busy_retry_s=0.1)
def flaky(ctx: StageContext, n: int) -> int:
    if ctx.attempt < n:
        raise Busy(f"item {n} busy on try {ctx.attempt}")
    return n
