"""Looping stages for the loop-overhead benchmark; bench workers import this module."""

from __future__ import annotations

from typing import Any

from workers.api import Loop, Pipeline, StageContext
from workers.http import request_json

benchloop = Pipeline("benchloop")


def count(ctx: StageContext, iterations: int) -> Any:
    """One vendor call per iteration, ``iterations`` times, then return the last value."""
    value = request_json("GET", f"{ctx.params['vendor_url']}/fib/1", retries=0)["value"]
    if ctx.loop.iteration < iterations:
        raise Loop(ctx.loop.iteration)
    return value


# Every iteration its own Celery task, and the same with batched consumption (claim_batch=16).
benchloop.stage("count")(count)
benchloop.stage("count_batched", claim_batch=16)(count)
