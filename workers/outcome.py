"""What happened to one delivery: the engine's answer, logged, counted and shown in Flower."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    # Terminal: the item is done and counted in the ledger under this name.
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CACHED = "cached"
    SKIPPED = "skipped"
    # The item goes on: another message for it is on its way.
    LOOPED = "looped"
    RETRYING = "retrying"
    THROTTLED = "throttled"
    # Nothing was run.
    DUPLICATE = "duplicate"  # the item is already terminal
    STALE = "stale"  # an old copy of a loop iteration the item has moved past
    UNKNOWN_ITEM = "unknown_item"  # the run expired or never registered it
    DEAD_LETTER = "dead_letter"  # the message could not be decoded: set aside

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def ledger_code(self) -> str:
        """The one-letter state the Lua scripts keep for a terminal item."""
        return _CODES[self]


TERMINAL = frozenset({Outcome.SUCCEEDED, Outcome.FAILED, Outcome.CACHED, Outcome.SKIPPED})
_CODES = {Outcome.SUCCEEDED: "s", Outcome.FAILED: "f", Outcome.CACHED: "c", Outcome.SKIPPED: "k"}
