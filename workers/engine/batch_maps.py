"""Batch maps with kill switches (prefecto's ``BatchTask``, seed 003), event-driven.

``ctx.batch_map(stage, items, size=N, kill_switch=...)`` in a stage, or ``start_run(...,
batch_size=N, kill_switch=...)`` for a run's roots: every item is registered at once (the
run's counts and its finish see them all), only the first N are published. The item that
completes a batch (``finish_item.lua`` says so to exactly one caller) has its worker check the
kill switch on the map's counters, and then either publish the next batch or stop the run:
no polling loop, and at most N items of a map in flight. The switch is checked after every
batch, the last included (prefecto skips the last), and per item when asked. A trip skips
everything not yet published and ends the run ``killed`` with the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

from workers.api import Stage
from workers.engine.services import Services
from workers.ids import RawJSON, canonical_json, item_id
from workers.ledger import MapSignal
from workers.message import Delivery
from workers.policy.kill_switch import Counts, check, from_spec

log = logging.getLogger("fanout.batch_maps")


def map_id(stage: str, parent_id: str) -> str:
    """The map's id: the same for the same parent and stage (a parent delivered twice)."""
    return hashlib.blake2b(f"{parent_id}|{stage}".encode(), digest_size=8).hexdigest()


def start(
    services: Services, stage: Stage, run_id: str, parent_id: str, items: Sequence[Any],
    size: int, switch_spec: dict[str, Any] | None, per_item: bool = False, *,
    as_roots: bool = False,
) -> int:
    """Register a batch map and publish its first batch. Returns how many items it has."""
    texts = [RawJSON(canonical_json(item)) for item in items]
    entries = [(item_id(stage.name, parent_id, i, text), text) for i, text in enumerate(texts)]
    first = services.ledger.maps.create(
        run_id, map_id(stage.name, parent_id), stage.task_name, stage.name, size, switch_spec,
        per_item, entries, as_roots=as_roots,
    )
    _publish(services, stage.task_name, run_id, first)
    return len(entries)


def settle(services: Services, signals: Sequence[MapSignal]) -> None:
    """Act on what finished items of batch maps said: check switches, release batches."""
    ledger = services.ledger
    for signal in signals:
        state = ledger.maps.state(signal.run_id, signal.map_id)
        if state is None or state["complete"] == 1:
            continue
        counts = Counts(succeeded=int(state["s"]), failed=int(state["f"]),
                        skipped=int(state["k"]), cached=int(state["c"]))
        switch = from_spec(json.loads(state["switch"])) if state["switch"] else None
        trip = check(switch, counts)
        if trip is not None:
            reason = (f"{trip.reason}: {state['stage']} batch map stopped after "
                      f"{counts.finished} of {int(state['total'])} items "
                      f"({counts.succeeded} succeeded, {counts.failed} failed)")
            skipped = ledger.runs.stop(signal.run_id, "killed", reason)
            log.warning("run %s killed: %s; %d items skipped", signal.run_id, reason,
                        max(0, skipped))
        elif signal.deciding:
            released = ledger.maps.settle(signal.run_id, signal.map_id)
            _publish(services, state["task"], signal.run_id, released)


def _publish(services: Services, task: str, run_id: str, batch: Sequence[tuple[str, str]]) -> None:
    services.transport.publish(
        [Delivery(task, run_id, item, RawJSON(payload)) for item, payload in batch]
    )
