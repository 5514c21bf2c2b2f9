"""Pipelines for the Flower tests; workers import this module
(FANOUT_PIPELINES=flower_pipelines). Each run's roots are given to its one stage.

``held.leaf`` and ``heldbatch.leaf`` go through a global limit each (``HELD_LIMIT``,
``HELD_BATCH_LIMIT``): a test sets it to one call an hour, so the first item passes and the
others are held back (throttled) for about an hour. ``heldbatch.leaf`` claims a batch: the
items it holds back are told to Flower by fanout's own task events, ``held.leaf``'s by
Celery's.
"""

from __future__ import annotations

from workers.api import Pipeline, StageContext

HELD_LIMIT = "flower-held"
HELD_BATCH_LIMIT = "flower-held-batch"

held = Pipeline("held")
heldbatch = Pipeline("heldbatch")


@held.stage("leaf", limits=[HELD_LIMIT])
def held_leaf(ctx: StageContext, item: str) -> str:
    return item


@heldbatch.stage("leaf", limits=[HELD_BATCH_LIMIT], claim_batch=8)
def held_batch_leaf(ctx: StageContext, item: str) -> str:
    return item
