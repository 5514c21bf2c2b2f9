"""The run ledger: runs, per-stage counters, item states and failures, all in Redis.

Registering items and moving them to a terminal state are Lua scripts (``workers/lua/``), so
a duplicate delivery never double-counts, and the item that brings ``pending`` to zero
finishes the run, exactly once, without chords or polling. One module per concern, each
owning its part of the keys in ``keys.RunKeys``:

- ``runs``: create, stop, replay a run; the runs index (``keys.RUNS_INDEX``)
- ``items``: register and finish items, count retries and throttles
- ``maps``: batch maps and their batches
- ``loops``: looping items' iterations
- ``view``: what ``fanout status`` reads, and waiting for a run to end
- ``calls``: how they all call their scripts, and ``LedgerError``
"""

from __future__ import annotations

import redis

from workers.ledger.calls import LedgerError
from workers.ledger.items import Items
from workers.ledger.loops import Loops
from workers.ledger.maps import BatchMaps
from workers.ledger.records import COUNTERS, FINISHED, Finish, MapSignal, RunSnapshot
from workers.ledger.runs import Runs
from workers.ledger.view import RunView

__all__ = ["COUNTERS", "FINISHED", "Finish", "Ledger", "LedgerError", "MapSignal",
           "RunSnapshot"]


class Ledger:
    """The ledger of one Redis: its parts, one per concern (``ledger.runs.create(...)``,
    ``ledger.view.snapshot(...)``), each keeping what it writes for ``ttl_s``. One instance
    per process."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.runs = Runs(client, ttl_s)
        self.items = Items(client, ttl_s)
        self.maps = BatchMaps(client, ttl_s)
        self.loops = Loops(client, ttl_s)
        self.view = RunView(client, ttl_s)
