"""The sink gate on its own: threads that meet an outage wait while one of them probes, the
outage is told once each way, and a write gives up after its longest wait or at shutdown.
(End to end, with a worker and PostgreSQL behind a proxy: test_sink_outage.py.)"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from producers.report import NoWorkerWatch
from workers.sinks import SinkDown
from workers.sinks.gate import SinkGate


class Sink:
    """Down until ``up`` is set; counts probes and who probed at once."""

    def __init__(self) -> None:
        self.up = threading.Event()
        self.probes = 0
        self.probing = 0
        self.most_probing = 0
        self.lock = threading.Lock()

    def write(self) -> str:
        if not self.up.is_set():
            raise SinkDown("connection refused")
        return "written"

    def probe(self) -> None:
        with self.lock:
            self.probes += 1
            self.probing += 1
            self.most_probing = max(self.most_probing, self.probing)
            if self.probes == 4:
                self.up.set()  # back at the fourth probe
        with self.lock:
            self.probing -= 1
        if not self.up.is_set():
            raise SinkDown("connection refused")


def gate(said: list[str], notes: list[str | None], **options: float) -> SinkGate:
    return SinkGate(say_down=lambda e: said.append(f"down: {e}"),
                    say_back=lambda s: said.append("back"), note=notes.append,
                    first_delay_s=0.01, max_delay_s=0.04, **options)


def test_writers_wait_while_one_probes_and_the_outage_is_told_once() -> None:
    sink, said, notes = Sink(), [], []
    sink_gate = gate(said, notes)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: sink_gate.write(sink.write, sink.probe), range(8)))
    assert results == ["written"] * 8
    assert sink.probes == 4 and sink.most_probing == 1
    assert said == ["down: connection refused", "back"]
    # At the start, at each of the 3 failed probes, and cleared at the end.
    assert notes == ["connection refused"] * 4 + [None]
    assert not sink_gate.down


def test_a_write_gives_up_after_its_longest_wait() -> None:
    sink, said, notes = Sink(), [], []
    sink.probes = -10**6  # never back
    sink_gate = gate(said, notes, max_wait_s=0.2)
    with pytest.raises(SinkDown, match=r"connection refused \(waited 0.2 s: the messages go back"):
        sink_gate.write(sink.write, sink.probe)
    assert sink_gate.down and said == ["down: connection refused"]


def test_at_shutdown_every_waiting_write_gives_up_at_once() -> None:
    sink, said, notes = Sink(), [], []
    sink.probes = -10**6
    sink_gate = gate(said, notes, max_wait_s=600)
    errors: list[str] = []

    def write() -> None:
        try:
            sink_gate.write(sink.write, sink.probe)
        except SinkDown as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    sink_gate.stop()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    assert len(errors) == 4 and all("shutting down" in e for e in errors)


def test_a_standstill_with_the_sink_down_is_said_once_instead_of_no_worker() -> None:
    now = [0.0]
    said: list[str] = []
    watch = NoWorkerWatch(lambda q: 3, said.append, clock=lambda: now[0], after_s=5,
                          sink_down=lambda: "sink postgresql://h/db: connection refused")
    for _ in range(80):  # twenty seconds without progress, messages waiting
        watch.update("no progress", ["fanout.demo.metric_day"])
        now[0] += 0.25
    assert said == ["workers are up but cannot write to the sink: "
                    "sink postgresql://h/db: connection refused"]


def test_a_write_under_way_when_the_sink_went_down_does_not_say_it_is_back() -> None:
    """A write that began before another write met the outage, and then succeeded (its
    connection answered just before the cut), leaves the outage as it is: only a write or a
    probe tried since can end it. Before, it ended it and the next failure told it again."""
    sink, said, notes = Sink(), [], []
    sink.probes = -10**6  # the probes never find it back
    sink_gate = gate(said, notes, max_wait_s=600)
    began = threading.Event()
    finish = threading.Event()

    def slow_write() -> str:
        began.set()
        finish.wait(5)
        return "written before the cut"

    with ThreadPoolExecutor(1) as pool:
        under_way = pool.submit(sink_gate.write, slow_write, sink.probe)
        assert began.wait(5)
        sink_gate.went_down(SinkDown("connection refused"))  # another thread's write failed
        finish.set()
        assert under_way.result(5) == "written before the cut"
    assert sink_gate.down
    assert said == ["down: connection refused"]


def test_a_write_begun_before_the_sink_came_back_that_fails_is_tried_again_untold() -> None:
    """A write under way through the outage (waiting on a connection the cut broke) fails
    just after a probe found the sink back: it is tried again, and no second outage is told.
    Before, its failure started one ("sink unreachable" twice in test_sink_outage)."""
    said, notes = [], []
    sink_gate = gate(said, notes, max_wait_s=600)
    sink_gate.went_down(SinkDown("connection refused"))
    began, back = threading.Event(), threading.Event()
    tries: list[str] = []

    def write_on_a_broken_connection() -> str:
        tries.append("try")
        if len(tries) == 1:
            began.set()
            back.wait(5)
            raise SinkDown("server closed the connection unexpectedly")
        return "written"

    # The write goes past the gate as if it had started before the outage was told.
    sink_gate._since = None
    with ThreadPoolExecutor(1) as pool:
        under_way = pool.submit(sink_gate.write, write_on_a_broken_connection, lambda: None)
        assert began.wait(5)
        sink_gate._since = 0.0  # the outage, told while the write was under way
        sink_gate._came_back()  # a probe found the sink back
        back.set()
        assert under_way.result(5) == "written"
    assert tries == ["try", "try"]
    assert said == ["down: connection refused", "back"]
    assert not sink_gate.down
