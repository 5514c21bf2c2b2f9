"""The sink interface: where leaf records go, upserted on their natural key.

A sink says what went wrong in one of three kinds, so the engine puts each error in its
bucket: ``SinkDown`` (unreachable now, may come back: an outage, the items wait), a
``SinkDataError`` (these records are refused: their items fail), and ``ConfigError`` (the sink
can never work as configured: the worker or command refuses to start).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

NATURAL_KEY = ("vendor", "account", "service", "metric", "day")


class SinkDown(Exception):
    """The sink cannot be reached or written now (connection refused or lost, a pool timeout,
    a locked or full disk): nothing is wrong with the records, a later try may succeed."""


class SinkDataError(Exception):
    """The sink refused the records for what they hold (a constraint, a type, a NUL byte):
    writing them again gives the same answer."""


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
        """Upsert ``records``; durable when it returns. Returns how many were written.
        Raises ``SinkDown`` or ``SinkDataError`` (all or none of ``records`` are written)."""
        ...

    def probe(self) -> None:
        """Raise ``SinkDown`` unless the sink answers now (one cheap round trip)."""
        ...

    def count(self, run_id: str | None = None) -> int:
        """Rows in the sink, or rows last written by ``run_id``."""
        ...

    def close(self) -> None:
        """Release the sink's connections."""
        ...
