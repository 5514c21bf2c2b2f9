"""Batch-map pipelines for the tests; workers import this module (FANOUT_PIPELINES).

``fetch`` asks the demo vendor for ``/fib/N`` (so the vendor counts what ran); an item whose
``fail`` is true raises. ``fanout_in_batches`` batch-maps its item's list to ``fetch``."""

from __future__ import annotations

from typing import Any

from workers.api import Pipeline, StageContext
from workers.http import request_json
from workers.policy.kill_switch import Counts, from_spec

batchtest = Pipeline("batchtest")


def more_than_one_failed(counts: Counts) -> bool:
    """A kill switch of one's own: a function of the counters, importable by workers."""
    return counts.failed > 1


@batchtest.stage("fetch")
def fetch(ctx: StageContext, item: dict[str, Any]) -> int:
    value = int(request_json("GET", f"{ctx.params['vendor_url']}/fib/{item['n']}",
                             retries=0)["value"])
    if item.get("fail"):
        raise ValueError(f"item {item['n']} is bad")
    return value


@batchtest.stage("parent")
def fanout_in_batches(ctx: StageContext, spec: dict[str, Any]) -> None:
    switch = from_spec(spec["switch"]) if spec.get("switch") else None
    ctx.batch_map("fetch", spec["items"], size=spec["size"], kill_switch=switch,
                  per_item=spec.get("per_item", False))
