"""SQLite sink: WAL, one connection per process, group commit across worker threads.

A task's rows must be on disk before its message is acked (a SIGKILL after the ack must lose
nothing), so ``write`` waits for the commit. Threads that arrive while a commit is running
join the next one: one transaction carries the rows of many tasks. When that transaction is
refused for the rows one task gave (a NULL value, a type SQLite cannot bind), each task's rows
are written again in a transaction of their own, so only that task hears of it (a
``SinkDataError``); an OperationalError (a locked or full disk, a read-only file) is
``SinkDown`` for every task of the transaction.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from workers.sinks.base import Record, SinkDataError, SinkDown

_SCHEMA = """
CREATE TABLE IF NOT EXISTS metrics (
    vendor TEXT NOT NULL,
    account TEXT NOT NULL,
    service TEXT NOT NULL,
    metric TEXT NOT NULL,
    day TEXT NOT NULL,
    value REAL NOT NULL,
    run_id TEXT NOT NULL,
    fetched_at REAL NOT NULL,
    PRIMARY KEY (vendor, account, service, metric, day)
)
"""
_SETUP_TIMEOUT_S = 30.0
_UPSERT = """
INSERT INTO metrics (vendor, account, service, metric, day, value, run_id, fetched_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (vendor, account, service, metric, day) DO UPDATE SET
    value = excluded.value, run_id = excluded.run_id, fetched_at = excluded.fetched_at
"""
#: Refusals of the rows themselves; any other sqlite3.Error is about the database.
_DATA_ERRORS = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.DataError,
                sqlite3.ProgrammingError)

Row = tuple[object, ...]


@dataclass
class _Chunk:
    """The rows of one ``write`` call, and what became of them."""

    rows: list[Row]
    done: bool = False
    refused: SinkDataError | None = None


class SqliteSink:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        self._set_up()
        self._pending: list[_Chunk] = []
        self._pending_lock = threading.Lock()
        self._commit_lock = threading.Lock()

    def _set_up(self) -> None:
        """WAL and the table. Two processes opening a new file at once: switching it to WAL
        answers "database is locked" at once to one of them, whatever the busy timeout (1 in
        10 fresh starts of two workers); it goes through on another try."""
        deadline = time.monotonic() + _SETUP_TIMEOUT_S
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                # NORMAL is durable across a process kill in WAL mode (an OS crash can lose
                # the last commits).
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._conn.execute(_SCHEMA)
                self._conn.commit()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def write(self, records: Sequence[Record], run_id: str) -> int:
        if not records:
            return 0
        now = time.time()
        chunk = _Chunk([
            (r.vendor, r.account, r.service, r.metric, r.day, r.value, run_id, now)
            for r in records
        ])
        with self._pending_lock:
            self._pending.append(chunk)
        with self._commit_lock:
            if not chunk.done:  # else another thread committed our rows with its own
                with self._pending_lock:
                    chunks, self._pending = self._pending, []
                try:
                    self._commit(chunks)
                except BaseException:
                    # Hand the rows to the next committer: their writers are still waiting.
                    with self._pending_lock:
                        self._pending[:0] = [c for c in chunks if not c.done]
                    raise
        if chunk.refused is not None:
            raise chunk.refused
        return len(chunk.rows)

    def _commit(self, chunks: list[_Chunk]) -> None:
        """One transaction for all; if its rows are refused, one per chunk."""
        try:
            with self._conn:
                self._conn.executemany(_UPSERT, [row for c in chunks for row in c.rows])
        except _DATA_ERRORS:
            for chunk in chunks:
                try:
                    with self._conn:
                        self._conn.executemany(_UPSERT, chunk.rows)
                except _DATA_ERRORS as exc:
                    chunk.refused = SinkDataError(f"{type(exc).__name__}: {exc}")
                except sqlite3.Error as exc:
                    raise SinkDown(f"sink {self.path}: {exc}") from exc
                chunk.done = True
            return
        except sqlite3.Error as exc:
            raise SinkDown(f"sink {self.path}: {exc}") from exc
        for chunk in chunks:
            chunk.done = True

    def probe(self) -> None:
        try:
            with self._commit_lock:
                self._conn.execute("SELECT COUNT(*) FROM metrics WHERE 0").fetchone()
        except sqlite3.Error as exc:
            raise SinkDown(f"sink {self.path}: {exc}") from exc

    def count(self, run_id: str | None = None) -> int:
        with self._commit_lock:
            if run_id is None:
                row = self._conn.execute("SELECT COUNT(*) FROM metrics").fetchone()
            else:
                query = "SELECT COUNT(*) FROM metrics WHERE run_id = ?"
                row = self._conn.execute(query, (run_id,)).fetchone()
        return int(row[0])

    def close(self) -> None:
        self._conn.close()
