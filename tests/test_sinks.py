"""The contract every sink keeps, run against each of them: SQLite and PostgreSQL.

PostgreSQL: ``FANOUT_TEST_POSTGRES_URL`` (default: the local server, database ``test``). Each
test gets a schema of its own, dropped afterwards. Without a server these cases skip, unless
``FANOUT_REQUIRE_SERVICES`` is set (as in CI): then they fail.
"""

from __future__ import annotations

import multiprocessing
import random
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import POSTGRES_URL, require_service, rows_at, terminate_postgres_backends

from workers.redact import redact
from workers.settings import ConfigError
from workers.sinks import Record, Sink, SinkDataError, SinkDown, check_sink, open_sink

Row = tuple[str, str, str, str, str, float, str]


@pytest.fixture(params=["sqlite", "postgres"])
def sink_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'contract.db'}"
        return
    yield request.getfixturevalue("postgres_url")


@pytest.fixture
def sink(sink_url: str) -> Iterator[Sink]:
    sink = open_sink(sink_url)
    yield sink
    sink.close()


def record(i: int, value: float) -> Record:
    # Zero-padded, so natural-key order is numeric order in every collation.
    return Record("demo", f"acct-{i % 3}", f"svc-{i:04d}", "calls", "2024-01-01", value)


def as_row(r: Record, run_id: str) -> Row:
    return (r.vendor, r.account, r.service, r.metric, r.day, r.value, run_id)


def by_key(rows: list[Row]) -> list[Row]:
    return sorted(rows, key=lambda row: row[:5])


def test_write_reads_back_every_row(sink: Sink, sink_url: str) -> None:
    records = [record(i, i * 1.5) for i in range(50)]
    assert sink.write(records, "run-1") == 50
    assert sink.count() == 50
    assert sink.count("run-1") == 50
    assert rows_at(sink_url) == by_key([as_row(r, "run-1") for r in records])


def test_writing_keys_again_upserts(sink: Sink, sink_url: str) -> None:
    first = [record(i, 1.0) for i in range(40)]
    # Keys 30..49: ten already written by run-1 and ten new ones.
    second = [record(i, 2.0) for i in range(30, 50)]
    assert sink.write(first, "run-1") == 40
    assert sink.write(second, "run-2") == 20
    assert sink.count() == 50
    assert sink.count("run-1") == 30
    assert sink.count("run-2") == 20
    expected = [as_row(r, "run-1") for r in first[:30]] + [as_row(r, "run-2") for r in second]
    assert rows_at(sink_url) == by_key(expected)


def test_duplicate_key_in_one_batch_keeps_the_last(sink: Sink, sink_url: str) -> None:
    batch = [record(1, 1.0), record(2, 2.0), record(1, 3.0), record(1, 4.0)]
    assert sink.write(batch, "run-1") == 4  # records given, as written in turn
    assert sink.count() == 2
    expected = [as_row(record(1, 4.0), "run-1"), as_row(record(2, 2.0), "run-1")]
    assert rows_at(sink_url) == expected


def test_concurrent_writers_of_overlapping_keys(sink: Sink, sink_url: str) -> None:
    """8 threads each upsert keys 20t .. 20t+59 (shared with the next two threads), in
    batches of 10 taken in their own random order: the shape that deadlocks writers that lock
    rows in the order given."""
    threads, rounds = 8, 3
    start = threading.Barrier(threads)

    def writer(t: int) -> int:
        rng = random.Random(t)
        keys = list(range(20 * t, 20 * t + 60))
        start.wait()
        written = 0
        for _ in range(rounds):
            rng.shuffle(keys)
            for k in range(0, len(keys), 10):
                batch = [record(i, float(t)) for i in keys[k : k + 10]]
                written += sink.write(batch, f"run-{t}")
        return written

    with ThreadPoolExecutor(threads) as pool:
        written = list(pool.map(writer, range(threads)))

    assert written == [60 * rounds] * threads
    union = 20 * (threads - 1) + 60
    assert sink.count() == union
    assert sum(sink.count(f"run-{t}") for t in range(threads)) == union
    rows = rows_at(sink_url)
    assert [row[:5] for row in rows] == sorted(as_row(record(i, 0), "")[:5] for i in range(union))
    # No torn rows: each row's value and run id come from one write.
    assert all(row[6] == f"run-{int(row[5])}" for row in rows)


def test_empty_write_returns_zero_without_the_database(sink: Sink) -> None:
    assert sink.write([], "run-1") == 0
    assert sink.count() == 0
    sink.close()  # a write that touched the database would fail now
    assert sink.write([], "run-1") == 0


def test_count_of_an_unknown_run_is_zero(sink: Sink) -> None:
    assert sink.write([record(i, 1.0) for i in range(5)], "run-1") == 5
    assert sink.count("no-such-run") == 0


def test_a_record_the_sink_refuses_fails_only_its_own_write(
    sink: Sink, sink_url: str
) -> None:
    """SQLite's group commit carries the rows of many writers in one transaction: the one
    whose row is refused (NULL value) hears of it, the others are written."""
    bad = Record("demo", "acct-9", "svc-9", "calls", "2024-01-01", None)  # type: ignore[arg-type]
    good = [[record(i, float(i))] for i in range(8)]
    barrier = threading.Barrier(9)

    def write(records: list[Record]) -> str:
        barrier.wait()
        try:
            sink.write(records, "run-1")
        except SinkDataError as exc:
            return f"refused: {exc}"
        return "written"

    with ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(write, [*good, [bad]]))
    assert answers[:8] == ["written"] * 8
    assert answers[8].startswith("refused: IntegrityError") or \
        answers[8].startswith("refused: NotNullViolation"), answers[8]
    assert rows_at(sink_url) == by_key([as_row(r[0], "run-1") for r in good])


def _psycopg_or_skip() -> None:
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        require_service(f"psycopg or psycopg_pool not installed ({exc})")


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_unreachable_postgres_is_down_and_names_the_redacted_url(scheme: str) -> None:
    """Nothing listening may be an outage (the worker waits), and a command that starts a run
    refuses it in one line (check_sink: a ConfigError)."""
    _psycopg_or_skip()
    url = f"{scheme}://fanout:s3cret-pw@127.0.0.1:1/test"
    with pytest.raises(SinkDown) as down:
        open_sink(url)
    with pytest.raises(ConfigError) as refused:
        check_sink(url)
    for message in (str(down.value), str(refused.value)):
        assert f"{scheme}://fanout:***@127.0.0.1:1/test" in message
        assert "\n" not in message
        assert "s3cret" not in message


def test_a_missing_postgres_database_can_never_work() -> None:
    _psycopg_or_skip()
    url = POSTGRES_URL.rsplit("/", 1)[0] + "/fanout_no_such_db"
    with pytest.raises(ConfigError, match='database "fanout_no_such_db" does not exist'):
        open_sink(url)


def test_postgres_sink_without_psycopg_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # makes `import psycopg` fail
    monkeypatch.delitem(sys.modules, "workers.sinks.postgres", raising=False)
    with pytest.raises(ConfigError, match=r"pip install 'fanout\[postgres\]'"):
        open_sink(POSTGRES_URL)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        (
            "postgresql://u@h/db?password=pw&sslmode=require",
            "postgresql://u@h/db?password=***&sslmode=require",
        ),
        ("postgresql://h/db", "postgresql://h/db"),
    ],
)
def test_redact_hides_the_password(url: str, shown: str) -> None:
    assert redact(url) == shown


def _open_at_once(path: str, barrier: Any, outcomes: Any) -> None:
    barrier.wait()
    try:
        open_sink(f"sqlite:///{path}").close()
    except Exception as exc:  # told to the parent
        outcomes.put(repr(exc))
    else:
        outcomes.put("ok")


def test_processes_opening_a_new_sqlite_file_at_once_all_succeed(tmp_path: Path) -> None:
    """Two workers starting together on a new sink file: switching it to WAL answered
    'database is locked' to one of them about 1 time in 10."""
    ctx = multiprocessing.get_context("fork")
    outcomes = ctx.Queue()
    for attempt in range(20):
        path = str(tmp_path / f"race{attempt}.db")
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_open_at_once, args=(path, barrier, outcomes))
                 for _ in range(4)]
        for proc in procs:
            proc.start()
        # Each process tells its outcome, so exactly four are read (Queue.empty() after a
        # join may say empty while a message is still on its way).
        told = sorted(outcomes.get(timeout=60) for _ in procs)
        for proc in procs:
            proc.join(60)
        assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
        assert told == ["ok"] * 4, f"attempt {attempt}: {told}"


def test_postgres_sink_replaces_connections_the_server_closed(postgres_url: str) -> None:
    """After a PostgreSQL restart the pool's idle connections are dead: each is checked when
    taken and replaced, so no write fails for it."""
    application = f"fanout-sink-{uuid.uuid4().hex[:8]}"
    sink = open_sink(f"{postgres_url}&application_name={application}")
    try:
        assert sink.write([record(1, 1.0)], "run-1") == 1
        assert terminate_postgres_backends(application) >= 1
        assert sink.write([record(2, 2.0)], "run-1") == 1
        assert sink.count("run-1") == 2
    finally:
        sink.close()
