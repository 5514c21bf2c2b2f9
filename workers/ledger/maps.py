"""Batch maps (DESIGN 4.3): items registered all at once, released one batch at a time.

``lua/batch_map.lua`` creates a map and gives back its first batch; ``lua/finish_item.lua``
counts each finished item in its map and marks the map ``deciding`` when a batch is done;
the engine checks the kill switch and then settles (``lua/batch_settle.lua``): the next
batch, or the map's pending token back to the run. State: ``RunKeys.batchmaps``, ``bmof``,
``bmqueue``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import redis

from workers import scripts
from workers.ids import canonical_json
from workers.keys import RunKeys
from workers.ledger.calls import call, flat_pairs, reply_pairs


class BatchMaps:
    """Create, read and settle the batch maps of runs."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._create = scripts.load("batch_map")
        self._settle = scripts.load("batch_settle")

    def create(
        self, run_id: str, map_id: str, task: str, stage: str, size: int,
        switch_spec: dict[str, Any] | None, per_item: bool, entries: Sequence[tuple[str, Any]],
        *, as_roots: bool = False,
    ) -> list[tuple[str, str]]:
        """Register a batch map's items; returns the first batch (id, payload JSON) to
        publish, [] when the map existed already. ``LedgerError`` NORUN: no such run."""
        args = [map_id, task, stage, size, canonical_json(switch_spec) if switch_spec else "",
                int(per_item), int(as_roots), time.time(), self.ttl_s, *flat_pairs(entries)]
        return reply_pairs(call(self._create, self.redis, run_id, args))

    def state(self, run_id: str, map_id: str) -> dict[str, Any] | None:
        """The map's state (see ``keys.py``: ``batchmaps``), None when there is none."""
        raw = self.redis.hget(RunKeys.of(run_id).batchmaps, map_id)
        return None if raw is None else dict(json.loads(raw))

    def deciding(self, run_id: str) -> list[str]:
        """Batch maps whose completed batch was never settled (its worker died meanwhile)."""
        raw = self.redis.hgetall(RunKeys.of(run_id).batchmaps)
        return sorted(str(m) for m, state in raw.items() if json.loads(state)["deciding"] == 1)

    def settle(self, run_id: str, map_id: str) -> list[tuple[str, str]]:
        """The map's completed batch passed its switch: the next batch to publish, or []
        (the last batch is done, or someone else settled it)."""
        args = [map_id, time.time(), self.ttl_s]
        return reply_pairs(call(self._settle, self.redis, run_id, args))
