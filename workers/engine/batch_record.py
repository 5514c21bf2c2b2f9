"""The end of a batch: its records to the sink, then its terminal transitions to the ledger.

Records first, so a counted item has its rows. Through a sink outage the batch waits at this
process's sink gate (``sinks/gate.py``), its records in memory, and only once the gate gives
up (``SinkDown``) do its messages go back. Records the sink refuses for their values
(``SinkDataError``) fail the items that gave them, found by writing item by item; the others
of the batch are written and counted.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from workers.engine import batch_maps
from workers.engine.services import Services
from workers.ledger import Finish
from workers.message import Delivery
from workers.outage import SinkOutageNote
from workers.outcome import Outcome
from workers.settings import ConfigError
from workers.sinks import Record, Sink, SinkDataError, SinkDown
from workers.sinks.gate import SinkGate, sink_gate

log = logging.getLogger("fanout")

#: The end of a failure's traceback kept in the ledger and in task events.
TRACEBACK_CHARS = 4000


def format_traceback(exc: BaseException) -> str:
    """``exc`` with its traceback and causes, its last ``TRACEBACK_CHARS`` characters."""
    return "".join(traceback.format_exception(exc))[-TRACEBACK_CHARS:]


def process_gate(services: Services) -> SinkGate:
    """This process's sink gate, telling each outage once on the ``fanout`` logger and noting
    it in Redis for producers."""
    def make() -> SinkGate:
        return SinkGate(
            say_down=lambda error: log.warning(
                "sink unreachable (%s): writes wait until it is back, their messages kept",
                error),
            say_back=lambda seconds: log.info("sink is back after %s s", seconds),
            note=SinkOutageNote(services.ledger.redis),
        )
    return sink_gate(make)


CopyOf = tuple[str, str, int]  # (run, item, iteration): one message, whatever its attempt


@dataclass(frozen=True)
class Write:
    """The records of one item, for the sink, and what fails it if the sink refuses them."""

    finish: int  # its index in ``Batch.finishes``
    delivery: Delivery
    records: Sequence[Record]


@dataclass
class Batch:
    """Terminal transitions deferred to the end of a batch, with the records they wrote."""

    finishes: list[Finish] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    errors: dict[CopyOf, BaseException] = field(default_factory=dict)  # what a try raised

    def failed(self, delivery: Delivery, exc: BaseException) -> str:
        """Note ``exc`` as what ``delivery``'s try raised; returns its traceback, bounded."""
        self.errors[(delivery.run_id, delivery.item_id, delivery.iteration)] = exc
        return format_traceback(exc)

    def add(self, done: Finish, records: Sequence[Record] = (),
            delivery: Delivery | None = None) -> None:
        if records and delivery is not None:
            self.writes.append(Write(len(self.finishes), delivery, records))
        self.finishes.append(done)

    def records_by_run(self) -> dict[str, list[Record]]:
        by_run: dict[str, list[Record]] = defaultdict(list)
        for write in self.writes:
            by_run[write.delivery.run_id].extend(write.records)
        return by_run


def record(services: Services, batch: Batch) -> set[CopyOf]:
    """Records first, then the terminal transitions: a counted item has its rows. Through
    a sink outage the batch waits at the gate (``SinkDown`` once it gives up); the items
    whose records the sink refused end failed. Returns those items."""
    refused: set[CopyOf] = set()
    if batch.writes:  # a stage that writes no rows never opens the sink
        gate = process_gate(services)
        rejected = gate.write(lambda: _write(services, batch),
                              probe=lambda: _sink(services).probe())
        for write, exc in rejected:
            _refused(batch, write, exc)
            d = write.delivery
            refused.add((d.run_id, d.item_id, d.iteration))
    _, signals = services.ledger.items.finish_batch(batch.finishes)
    batch_maps.settle(services, signals)
    return refused

def _sink(services: Services) -> Sink:
    """The process's sink; one that cannot be opened now is down (a sink that can never
    work was refused at the worker's start, ``app.check_sink_at_start``)."""
    try:
        return services.sink()
    except ConfigError as exc:
        raise SinkDown(str(exc)) from exc

def _write(services: Services, batch: Batch) -> list[tuple[Write, SinkDataError]]:
    """All records, one write per run; if the sink refuses them for their data, item by
    item (upserts: rows written twice are written once). Returns the refused items."""
    sink = _sink(services)
    try:
        for run_id, records in batch.records_by_run().items():
            sink.write(records, run_id)
        return []
    except SinkDataError:
        pass
    rejected = []
    for write in batch.writes:
        try:
            sink.write(write.records, write.delivery.run_id)
        except SinkDataError as exc:
            rejected.append((write, exc))
    return rejected

def _refused(batch: Batch, write: Write, exc: SinkDataError) -> None:
    """The item of ``write`` fails (at once: the sink would refuse it again)."""
    delivery, done = write.delivery, batch.finishes[write.finish]
    trace = batch.failed(delivery, exc)
    failure = failure_of(done.stage, delivery, exc, trace, tries=1, first_at=time.time())
    batch.finishes[write.finish] = Finish(done.run_id, done.stage, done.item_id,
                                          Outcome.FAILED, done.iteration, failure=failure)
    log.warning("%s %s failed: the sink refused its %d records: %s", delivery.task,
                delivery.item_id, len(write.records), exc, exc_info=exc)


def failure_of(
    stage: str, delivery: Delivery, exc: BaseException, trace: str, *, tries: int,
    first_at: float,
) -> dict[str, object]:
    """What the ledger keeps of a failed item (``fanout failures``)."""
    return {
        "stage": stage,
        "item": delivery.payload,
        "error_type": type(exc).__name__,
        "message": str(exc)[:500],
        "traceback": trace,
        "attempts": delivery.attempt,
        "tries": tries,
        "iteration": delivery.iteration,
        "first_failed_at": first_at,
        "last_failed_at": time.time(),
    }
