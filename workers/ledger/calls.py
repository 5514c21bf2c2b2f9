"""How every part of the ledger calls its Lua scripts, and the one error they raise.

A script refuses a transition with an error reply whose first word is its code: ``NORUN``
(the run is unknown or expired), ``STOPPED`` (the run was killed or cancelled). ``call``
turns that reply into a ``LedgerError`` carrying the code, on every path; an error of
Redis itself (out of memory, read-only replica, ...) is no refusal and passes unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from workers.ids import to_json
from workers.keys import RunKeys
from workers.scripts import Script

# The codes the ledger's scripts answer with (``redis.error_reply('CODE message')``).
CODES = ("NORUN", "STOPPED")


class LedgerError(Exception):
    """The ledger refused a transition. ``code`` says why (see ``CODES``); the message is
    one line: ``run R: what the script said``."""

    def __init__(self, run_id: str, code: str, message: str) -> None:
        super().__init__(f"run {run_id}: {message}")
        self.run_id = run_id
        self.code = code


def call(script: Script, client: redis.Redis, run_id: str, args: Sequence[Any]) -> Any:
    """Run ``script`` on the keys of ``run_id``; a refusal raises ``LedgerError``."""
    try:
        return script(client, RunKeys.of(run_id), args)
    except redis.ResponseError as exc:
        code, _, message = str(exc).partition(" ")
        if code not in CODES:
            raise
        raise LedgerError(run_id, code, message) from exc


def flat_pairs(entries: Sequence[tuple[str, Any]]) -> list[str]:
    """(id, payload) pairs as the scripts take them: id, payload JSON, id, payload JSON, ..."""
    flat: list[str] = []
    for entry_id, payload in entries:
        flat += [entry_id, to_json(payload)]
    return flat


def reply_pairs(flat: Sequence[Any]) -> list[tuple[str, str]]:
    """A script's {id, payload JSON, ...} reply as (id, payload JSON) pairs."""
    return [(str(flat[i]), str(flat[i + 1])) for i in range(0, len(flat), 2)]
