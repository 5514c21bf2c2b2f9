"""A pipeline whose tasks outlast the visibility timeout, for tests/test_crash_recovery.py;
workers import this module (FANOUT_PIPELINES).

``long`` sleeps ``sleep_s`` and fans out 0..N-1 to ``batched`` (``claim_batch=4``), each item
of which sleeps ``item_sleep_s``. Every call of a stage adds 1 to its item's count in the
hash ``slowtest:calls:RUN`` (``long:N``, ``batched:I``): a test counts executions there.
"""

from __future__ import annotations

import os
import time

import redis

from workers.api import Pipeline, StageContext


def calls_key(run_id: str) -> str:
    return f"slowtest:calls:{run_id}"


def _count(ctx: StageContext, name: str) -> None:
    client = redis.Redis.from_url(os.environ["FANOUT_REDIS_URL"])
    client.hincrby(calls_key(ctx.run_id), name, 1)
    client.expire(calls_key(ctx.run_id), 600)


slowtest = Pipeline("slowtest")


@slowtest.stage("long", maps_to="batched")
def long(ctx: StageContext, n: int) -> list[int]:
    _count(ctx, f"long:{n}")
    time.sleep(float(ctx.params["sleep_s"]))
    return list(range(n))


@slowtest.stage("batched", claim_batch=4)
def batched(ctx: StageContext, i: int) -> int:
    _count(ctx, f"batched:{i}")
    time.sleep(float(ctx.params["item_sleep_s"]))
    return i
