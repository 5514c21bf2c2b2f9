"""fanout's sleep-leaf pipeline for the harvest suite (``fanout-sleep``); bench workers load it
through ``FANOUT_PIPELINES=benchmarks.sleep_pipeline``.

The demo pipeline's own roots, ``accounts`` and ``services`` stages (the same listing calls to
the vendor, the same fan-out), and a ``metric_day`` leaf with the demo leaf's settings
(its ``claim_batch``, its retries) whose body only sleeps for the vendor's latency: no HTTP, no
sink, no record. Like the demo leaf it is an ``async def`` (``asyncio.sleep``): a claimed
batch's items sleep together on the worker's event loop. What a leaf then costs is fanout's
framework alone, as in the baselines' ``sleep`` leaf kind (``benchmarks/leaf.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses

from benchmarks.leaf import SLEEP_S
from workers.api import Pipeline, StageContext
from workers.pipelines import demo as demo_module

PIPELINE = "benchsleep"

benchsleep = Pipeline(PIPELINE, vendor="demo")
benchsleep.params(demo_module.check_params)
benchsleep.roots("accounts")(demo_module.list_accounts)
benchsleep.stage("accounts", maps_to="services")(demo_module.account)
benchsleep.stage("services", maps_to="metric_day")(demo_module.service)


async def metric_day(ctx: StageContext, item: dict[str, str]) -> None:
    await asyncio.sleep(SLEEP_S)


# The demo leaf's Stage with this body: claim_batch, retry policy, hooks and limits stay equal.
benchsleep.stages["metric_day"] = dataclasses.replace(
    demo_module.demo.stages["metric_day"], pipeline=PIPELINE, fn=metric_day
)
