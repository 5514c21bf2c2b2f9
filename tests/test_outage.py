"""One line per outage (``workers/outage.py``), the wait of ``fanout run --wait`` through an
outage, and its "no worker" notice (``producers/report.py``): units with a moved clock and
fakes, no Redis."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import pytest
import redis
from celery.exceptions import Reject
from conftest import FakeClock
from kombu.exceptions import OperationalError

from producers.report import NoWorkerWatch, RedisGone, wait_for_run
from workers.app import outage_filter
from workers.ledger import RunSnapshot
from workers.outage import DOWN_ERRORS, OncePerOutage, Outage, shared, where

T0 = 100.0  # the tests' fake clock starts here
REFUSED = redis.ConnectionError("Error 111 connecting to 127.0.0.1:6399. Connection refused.")


def make_outage(clock: FakeClock) -> tuple[Outage, list[str]]:
    said: list[str] = []
    outage = Outage(said.append, "Redis down ({error})", "Redis back after {seconds:.1f} s",
                    clock=clock)
    return outage, said


def test_an_outage_is_told_once_when_it_starts_and_once_when_it_ends() -> None:
    clock = FakeClock(T0)
    outage, said = make_outage(clock)
    assert outage.ok() is None and said == []  # no outage: nothing to say

    for _ in range(50):  # five a second for ten seconds
        outage.failed(REFUSED)
        clock.advance(0.2)
    assert outage.down and outage.down_for_s() == pytest.approx(10.0)
    assert outage.ok() == pytest.approx(10.0)
    assert said == [
        "Redis down (Error 111 connecting to 127.0.0.1:6399. Connection refused.)",
        "Redis back after 10.0 s",
    ]
    assert not outage.down and outage.down_for_s() == 0.0

    outage.failed(REFUSED)  # the next outage is told again
    clock.advance(1.5)
    outage.ok()
    assert said[2:] == [said[0], "Redis back after 1.5 s"]


def test_the_wait_between_tries_grows_with_the_outage_up_to_a_cap() -> None:
    clock = FakeClock(T0)
    outage, _ = make_outage(clock)
    delays = []
    while clock.now < T0 + 30:  # thirty seconds of tries, each after the wait it was given
        delays.append(outage.failed(REFUSED))
        clock.advance(delays[-1])
    assert delays[0] == 0.25  # the first retry comes soon
    assert delays == sorted(delays)
    assert max(delays) == 2.0  # ... and the wait never exceeds the cap
    assert len(delays) < 30  # not the 150 of a try every 0.2 s
    outage.ok()
    assert outage.failed(REFUSED) == 0.25  # a new outage starts over


def test_threads_sharing_an_outage_tell_it_once() -> None:
    clock = FakeClock(T0)
    outage, said = make_outage(clock)
    threads = [threading.Thread(target=lambda: [outage.failed(REFUSED) for _ in range(100)])
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outage.ok()
    outage.ok()
    assert len(said) == 2


def test_shared_gives_one_outage_per_redis_and_shows_no_password() -> None:
    a = redis.Redis.from_url("redis://:secret@127.0.0.1:6399/2")
    b = redis.Redis.from_url("redis://:secret@127.0.0.1:6399/2")
    assert where(a) == "redis://127.0.0.1:6399/2"
    assert shared(a) is shared(b)
    assert shared(a) is not shared(redis.Redis.from_url("redis://127.0.0.1:6398/2"))
    assert "secret" not in shared(a).down_line + shared(a).back_line


def record(msg: str, *args: Any, exc: BaseException | None = None,
           level: int = logging.ERROR) -> logging.LogRecord:
    exc_info = None
    if exc is not None:
        try:
            raise exc
        except BaseException:
            exc_info = sys.exc_info()
    return logging.LogRecord("celery.worker.consumer.consumer", level, __file__, 1, msg, args,
                             exc_info)


def reject_caused_by(cause: BaseException) -> Reject:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise Reject(str(exc), requeue=True) from exc
    except Reject as reject:
        return reject


CANNOT_CONNECT = "consumer: Cannot connect to %s: %s.\n%s\n"


def test_the_filter_keeps_the_first_line_of_an_outage_and_drops_the_rest() -> None:
    clock = FakeClock(T0)
    log_filter = outage_filter()
    log_filter.clock = clock
    lost = record("%s (%r)", "consumer: Connection to broker lost. Trying to re-establish the "
                  "connection...", OperationalError("Connection refused"), level=logging.WARNING)
    assert log_filter.filter(lost)
    for attempt in range(1, 30):  # every reconnect attempt, every task that could not ack
        clock.advance(1)
        assert not log_filter.filter(record(CANNOT_CONNECT, "redis://127.0.0.1:6399/0",
                                            OperationalError("refused"),
                                            f"Trying again in 2.00 seconds... ({attempt}/100)"))
        assert not log_filter.filter(record(
            "Task %s cannot be acknowledged after a connection loss since late "
            "acknowledgement is enabled for it.", "demo.metric_day[x]"))
        assert not log_filter.filter(record("Task %(name)s[%(id)s] %(exc)s",
                                            exc=reject_caused_by(REFUSED)))
    assert log_filter.dropped == 3 * 29
    # Lines of anything else go through, in an outage too.
    assert log_filter.filter(record("Task %s succeeded", "demo.metric_day[y]", level=20))

    assert log_filter.filter(record("Connected to %s", "redis://127.0.0.1:6399/0", level=20))
    # The next outage is told again.
    assert log_filter.filter(record(CANNOT_CONNECT, "redis://", OperationalError("x"), "..."))


def test_a_record_seen_by_two_handlers_gets_one_decision() -> None:
    log_filter = outage_filter()
    first = record(CANNOT_CONNECT, "redis://", OperationalError("refused"), "(1/100)")
    assert log_filter.filter(first) and log_filter.filter(first)
    second = record(CANNOT_CONNECT, "redis://", OperationalError("refused"), "(2/100)")
    assert not log_filter.filter(second) and not log_filter.filter(second)
    assert log_filter.dropped == 1


def test_the_line_kept_is_one_line_with_its_error() -> None:
    log_filter = outage_filter()
    line = record("Task %(name)s[%(id)s] %(exc)s", exc=reject_caused_by(REFUSED))
    line.args = {"name": "demo.metric_day", "id": "r.i", "exc": "Reject(...)"}
    assert log_filter.filter(line)
    assert line.exc_info is None
    text = logging.Formatter().format(line)
    assert "\n" not in text
    assert text == ("Task demo.metric_day[r.i] Reject(...) "
                    "(Error 111 connecting to 127.0.0.1:6399. Connection refused.)")


def test_an_outage_nobody_speaks_of_for_a_while_is_over() -> None:
    clock = FakeClock(T0)
    log_filter = OncePerOutage(DOWN_ERRORS, ("Cannot connect",), ("Connected to",),
                               clock=clock, quiet_s=60)
    assert log_filter.filter(record("no Redis", exc=REFUSED))
    clock.advance(59)
    assert not log_filter.filter(record("no Redis", exc=REFUSED))
    clock.advance(61)  # a new outage, though nobody said the last one ended
    assert log_filter.filter(record("no Redis", exc=REFUSED))


def test_a_vendor_that_refuses_connections_is_not_a_redis_outage() -> None:
    log_filter = outage_filter()

    class VendorHTTPError(Exception):
        pass

    def vendor_error() -> VendorHTTPError:
        try:
            try:
                raise ConnectionRefusedError(111, "Connection refused")
            except ConnectionRefusedError as exc:
                raise VendorHTTPError("GET /accounts: connection refused") from exc
        except VendorHTTPError as error:
            return error

    for _ in range(3):
        assert log_filter.filter(record("%s %s failed: %s", "demo.metric_day", "x",
                                        vendor_error(), level=20))
        assert log_filter.filter(record("failed", exc=vendor_error()))


# -- producers/report.py ----------------------------------------------------------------


def test_no_worker_is_said_once_when_a_queue_stands_still() -> None:
    clock = FakeClock(T0)
    depths = {"fanout.demo.accounts": 2, "fanout.demo.services": 0}
    said: list[str] = []
    watch = NoWorkerWatch(depths.__getitem__, said.append, clock=clock, after_s=5)
    queues = list(depths)
    told_after_s = None
    for _ in range(40):  # ten seconds without progress, two messages waiting
        watch.update("no progress", queues)
        if said and told_after_s is None:
            told_after_s = clock.now - T0
        clock.advance(0.25)
    assert told_after_s == 5.0  # told once the standstill has lasted after_s, not before
    assert said == ["no worker is taking messages from fanout.demo.accounts: 2 waiting; "
                    "start one with `fanout worker`"]

    watch.update("progress", queues)  # a worker came: a later standstill is told again
    for _ in range(40):
        watch.update("progress", queues)
        clock.advance(0.25)
    assert len(said) == 2


def test_a_busy_worker_taking_messages_is_not_missing() -> None:
    clock = FakeClock(T0)
    depths = {"fanout.demo.metric_day": 500}
    said: list[str] = []
    watch = NoWorkerWatch(lambda q: depths[q], said.append, clock=clock, after_s=5)
    for _ in range(80):  # long tasks: no item finishes, but the queue goes down
        watch.update("no progress", list(depths))
        depths["fanout.demo.metric_day"] -= 1
        clock.advance(0.25)
    assert said == []


class FlakyLedger:
    """A ledger whose Redis is down for the first ``down`` calls of ``wait``."""

    def __init__(self, down: int, finished_after: int | None = None) -> None:
        self.redis = redis.Redis.from_url("redis://:pw@127.0.0.1:6399/0")
        self.down = down
        self.calls = 0
        self.finished_after = finished_after
        self.view = self  # wait_for_run reads ledger.view.wait and ledger.view.snapshot

    def wait(self, run_id: str, timeout_s: float) -> str | None:
        self.calls += 1
        if self.calls <= self.down:
            raise REFUSED
        return "succeeded" if self.finished_after and self.calls > self.finished_after else None

    def snapshot(self, run_id: str, stage_order: Any = ()) -> RunSnapshot:
        done = self.finished_after is not None and self.calls > self.finished_after
        return RunSnapshot(run_id, "demo", "succeeded" if done else "running", {}, 0.0,
                           1.0 if done else None, 0, {"accounts": {"enqueued": 1}}, 0)


def test_waiting_rides_out_an_outage_with_one_line_each_way(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("producers.report.time.sleep", lambda s: None)
    ledger = FlakyLedger(down=40, finished_after=42)
    snap = wait_for_run(ledger, "r", ["accounts"], console=None,  # type: ignore[arg-type]
                        outage_limit_s=300, depth=lambda q: 0)
    assert snap.status == "succeeded"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0] == ("Redis at redis://127.0.0.1:6399/0 unreachable: waiting for it "
                        "(gives up after 300 s)")
    assert lines[1].startswith("Redis is back after ")


def test_waiting_gives_up_after_the_outage_limit_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ledger = FlakyLedger(down=10**6)
    with pytest.raises(RedisGone) as gone:
        wait_for_run(ledger, "r", ["accounts"], console=None,  # type: ignore[arg-type]
                     outage_limit_s=0.6, depth=lambda q: 0)
    assert gone.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("unreachable: waiting for it (gives up after 1 s)")
    assert len(lines) == 2
    assert lines[1].startswith("Redis at redis://127.0.0.1:6399/0 still unreachable after ")
    assert lines[1].endswith(" s: giving up")
