"""A pipeline with hooks, for the tests; workers import this module (FANOUT_PIPELINES).

``numbers`` fans out 0..N-1 to ``fetch`` (one vendor call each). Three hooks, in order:
- ``DeferOnce`` defers item 4 once per run (counted ``throttled``, then it runs);
- ``SkipThree`` skips item 3 (counted ``skipped``, no vendor call);
- ``RedisMemo`` serves any item whose result it has kept (counted ``cached``); a served
  ``numbers`` item still fans out its children.
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis

from workers.api import Hook, Pipeline, StageContext, StageResult
from workers.hooks import Decision, Defer, Serve, Skip
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
