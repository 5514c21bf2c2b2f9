"""The sink interface: where leaf records go, upserted on their natural key."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

NATURAL_KEY = ("vendor", "account", "service", "metric", "day")


@dataclass(frozen=True)
class Record:
    """One leaf record. Its natural key is (vendor, account, service, metric, day)."""

    vendor: str
    account: str
    service: str
    metric: str
    day: str
    value: float


class Sink(Protocol):
    def write(self, records: Sequence[Record], run_id: str) -> int:
        """Upsert ``records``; durable when it returns. Returns how many were written."""
        ...

    def count(self, run_id: str | None = None) -> int:
        """Rows in the sink, or rows last written by ``run_id``."""
        ...

    def close(self) -> None: ...
