"""A pipeline module with a typo in a stage option (``retires``), for the tests: loading it
must fail with one clear line, not run the stage without retries."""

from __future__ import annotations

from workers.api import Pipeline, StageContext

typo = Pipeline("typo")


@typo.stage("leaf", retires=3)
def leaf(ctx: StageContext, n: int) -> int:
    return n
