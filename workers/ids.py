"""Deterministic ids and the canonical JSON they hash.

An item's id depends only on (parent, stage, index, arguments), so the same child of the same
parent always gets the same id: a parent delivered twice registers its children once.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


class RawJSON(str):
    """Text that is already canonical JSON: a fan-out serializes each child once and uses the
    text for its id, its ledger payload and its message."""

    __slots__ = ()


def to_json(value: Any) -> str:
    return value if isinstance(value, RawJSON) else canonical_json(value)


def item_id(stage: str, parent_id: str, index: int, args: Any) -> str:
    """``STAGE:HASH``: the stage name (``[a-z0-9_]+``) and a hash of where the item came from."""
    digest = hashlib.blake2b(
        f"{parent_id}|{stage}|{index}|{to_json(args)}".encode(), digest_size=8
    ).hexdigest()
    return f"{stage}:{digest}"


def stage_of_item(item: str) -> str:
    return item.split(":", 1)[0]


def loop_parent(item: str, iteration: int) -> str:
    """The parent id of what iteration ``iteration`` of a looping item fans out: page 2's
    first child is not page 1's."""
    return item if iteration == 1 else f"{item}@{iteration}"
