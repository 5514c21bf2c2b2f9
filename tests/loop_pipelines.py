"""Looping pipelines for the tests; workers import this module (FANOUT_PIPELINES)."""

from __future__ import annotations

from typing import Any

from workers.api import Loop, Pipeline, StageContext
from workers.http import request_json

looptest = Pipeline("looptest")


def fib_at(ctx: StageContext, n: int) -> int:
    return int(request_json("GET", f"{ctx.params['vendor_url']}/fib/{n}", retries=0)["value"])


@looptest.stage("fib", retries=2, retry_delay_s=0.1)
def largest_fib_below(ctx: StageContext, m: int) -> Any:
    """Seed 002's loop: one API call per iteration."""
    payload = ctx.loop.payload or {"n": 1, "fib": 1}
    next_fib = fib_at(ctx, payload["n"])
    if next_fib > m:
        return payload["fib"]
    raise Loop({"n": payload["n"] + 1, "fib": next_fib})


@looptest.stage("forever", max_iterations=5)
def forever(ctx: StageContext, item: Any) -> Loop:
    return Loop(ctx.loop.iteration)


@looptest.stage("wait_then_fetch")
def wait_then_fetch(ctx: StageContext, item: Any) -> Any:
    """Iteration 1 asks for a delay; iteration 2 makes one vendor call."""
    if ctx.loop.iteration == 1:
        return Loop("waited", delay_s=float(ctx.params["delay_s"]))
    return fib_at(ctx, 1)
