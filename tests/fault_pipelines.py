"""Pipelines whose parts fail on purpose, for the tests; workers import this module
(FANOUT_PIPELINES=fault_pipelines). Each run's roots are given to its one stage.

``hookfaults.leaf`` (item n returns n * 10; item 3 raises ValueError) with three hooks, in
order: ``Recorder("outer")``, ``Faulty()``, ``Recorder("inner")``. The recorders push each call
they get to a Redis list per run (``hookfaults:calls:RUN``: "outer.before:0" ...). ``Faulty``
raises in ``before`` for item 1, in ``after`` for item 2 and in ``on_failure`` for item 3.

``sinkfaults.leaf`` returns one record per item; item 3's has no value, which every sink
refuses (NOT NULL).

``flaky.leaf`` (one retry, no delay) raises ValueError on its first attempt when the item is
"retry", on every attempt when it is "fail", and returns the item otherwise.
"""

from __future__ import annotations

import os
from typing import Any

import redis

from workers.api import Hook, Pipeline, Record, StageContext, StageResult
from workers.hooks import Decision


def calls_key(run_id: str) -> str:
    return f"hookfaults:calls:{run_id}"


def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["FANOUT_REDIS_URL"], decode_responses=True)


class Recorder(Hook):
    def __init__(self, name: str) -> None:
        self.name = name

    def _note(self, ctx: StageContext, method: str, item: Any) -> None:
        client = _redis()
        client.rpush(calls_key(ctx.run_id), f"{self.name}.{method}:{item}")
        client.expire(calls_key(ctx.run_id), 600)

    def before(self, ctx: StageContext, item: Any) -> Decision | None:
        self._note(ctx, "before", item)
        return None

    def after(self, ctx: StageContext, item: Any, result: StageResult) -> None:
        self._note(ctx, "after", item)

    def on_failure(
        self, ctx: StageContext, item: Any, exc: BaseException, *, final: bool
    ) -> None:
        self._note(ctx, "on_failure" + (" final" if final else ""), item)


class Faulty(Hook):
    def before(self, ctx: StageContext, item: Any) -> Decision | None:
        if item == 1:
            raise RuntimeError("before broke on 1")
        return None

    def after(self, ctx: StageContext, item: Any, result: StageResult) -> None:
        if item == 2:
            raise RuntimeError("after broke on 2")

    def on_failure(
        self, ctx: StageContext, item: Any, exc: BaseException, *, final: bool
    ) -> None:
        if item == 3:
            raise RuntimeError("on_failure broke on 3")


hookfaults = Pipeline("hookfaults", hooks=[Recorder("outer"), Faulty(), Recorder("inner")])


@hookfaults.stage("leaf", claim_batch=8)
def hook_leaf(ctx: StageContext, n: int) -> int:
    if n == 3:
        raise ValueError(f"leaf {n} broke")
    return n * 10


sinkfaults = Pipeline("sinkfaults")


@sinkfaults.stage("leaf", claim_batch=8)
def sink_leaf(ctx: StageContext, n: int) -> Record:
    value = None if n == 3 else float(n)
    return Record("sinkfaults", "acct", f"svc-{n}", "m", "2026-01-01", value)  # type: ignore[arg-type]


flaky = Pipeline("flaky")


@flaky.stage("leaf", retries=1, retry_delay_s=0)
def flaky_leaf(ctx: StageContext, item: str) -> str:
    if item == "fail" or (item == "retry" and ctx.attempt == 1):
        raise ValueError(f"{item} on attempt {ctx.attempt}")
    return item
