"""A pipeline for tests/test_fair_share.py and the ``fairshare`` benchmark; workers import
this module (FANOUT_PIPELINES).

``spread`` fans its item, a count N, out to N ``leaf`` items (``claim_batch=16``), each of
which sleeps ``leaf_s`` (a vendor call's wait, so no machine runs the leaves faster than the
workers' threads allow) and writes one record, keyed by the run's ``label`` and its number.
``fairtest_async.wait`` is an ``async def`` root stage for runs that share one claimed batch.
"""

from __future__ import annotations

import asyncio
import time

from workers.api import Pipeline, Record, StageContext

fairtest = Pipeline("fairtest")


@fairtest.stage("spread", maps_to="leaf")
def spread(ctx: StageContext, count: int) -> list[int]:
    return list(range(count))


@fairtest.stage("leaf", claim_batch=16)
def leaf(ctx: StageContext, n: int) -> Record:
    time.sleep(float(ctx.params["leaf_s"]))
    return Record("fairtest", str(ctx.params["label"]), "s", "m", f"{n:06d}", float(n))


# Async items of several runs in one claimed batch (test_fair_share.py): each ``wait`` item
# sleeps its run's ``leaf_s`` on the worker's event loop, then writes one record.
fairtest_async = Pipeline("fairtest_async")


@fairtest_async.stage("wait", claim_batch=64)
async def wait(ctx: StageContext, n: int) -> Record:
    await asyncio.sleep(float(ctx.params["leaf_s"]))
    return Record("fairtest", str(ctx.params["label"]), "a", "m", f"{n:06d}", float(n))
