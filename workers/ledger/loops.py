"""Looping items (DESIGN 4.2): one item whose iterations are messages of their own. The
ledger keeps the current iteration and its payload (``RunKeys.loops``), so a duplicate of
an old iteration is not advanced twice and a lost one can be published again."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from workers import scripts
from workers.ids import canonical_json
from workers.keys import RunKeys
from workers.ledger.calls import call


class Loops:
    """Advance and read the loop state of looping items."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._advance = scripts.load("advance_loop")

    def advance(self, run_id: str, stage: str, item: str, iteration: int, payload: Any) -> bool:
        """Move a looping item from ``iteration`` to the next, exactly once."""
        state = canonical_json({"iteration": iteration + 1, "payload": payload})
        args = [item, stage, iteration, state, time.time(), self.ttl_s]
        return bool(call(self._advance, self.redis, run_id, args))

    def states(self, run_id: str) -> dict[str, dict[str, Any]]:
        """Loop state {iteration, payload} of every item that is looping."""
        raw = self.redis.hgetall(RunKeys.of(run_id).loops)
        return {str(k): json.loads(v) for k, v in raw.items()}
