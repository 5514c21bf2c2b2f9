"""PostgreSQL sink: a connection pool shared by the worker threads of one process.

Each ``write`` is one transaction, committed before it returns, so a task's rows are durable
before its message is acked. psycopg's errors are sorted into the sink's three kinds
(``sinks/base.py``): a server that refuses this URL for good (no such database or role, bad
password) is a ``ConfigError``, one that cannot be reached or lost the connection is
``SinkDown``, and a row it refuses for its values is a ``SinkDataError``. Concurrent writers
of overlapping keys cannot deadlock: every transaction upserts its rows in natural-key order,
so no two take row locks in opposite orders.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from workers.outage import OncePerOutage
from workers.redact import redact
from workers.settings import ConfigError
from workers.sinks.base import Record, SinkDataError, SinkDown

_SCHEMA = """
CREATE TABLE IF NOT EXISTS metrics (
    vendor TEXT NOT NULL,
    account TEXT NOT NULL,
    service TEXT NOT NULL,
    metric TEXT NOT NULL,
    day TEXT NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    run_id TEXT NOT NULL,
    fetched_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (vendor, account, service, metric, day)
)
"""
# Any constant: processes that start together take turns creating the table, since two
# concurrent CREATE TABLE IF NOT EXISTS can both miss it and one then fails.
_SCHEMA_LOCK_ID = 0x66616E6F7574  # "fanout"
_UPSERT = """
INSERT INTO metrics (vendor, account, service, metric, day, value, run_id, fetched_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (vendor, account, service, metric, day) DO UPDATE SET
    value = excluded.value, run_id = excluded.run_id, fetched_at = excluded.fetched_at
"""
_CONNECT_TIMEOUT_S = 10  # unless the URL sets connect_timeout; libpq's default is forever
#: What libpq says when the server refuses this URL for good. A failed connection carries no
#: SQLSTATE in psycopg, only the server's FATAL text; anything else (refused, timed out, "the
#: database system is starting up", too many clients) may pass later: an outage.
_REFUSED_FOR_GOOD = ("does not exist", "authentication failed", "no pg_hba.conf entry",
                     "password", "permission denied")
#: Statement errors that are about the sink, not the rows (the table gone, rights revoked):
#: an operator can fix them while the items wait.
_NOT_ABOUT_DATA = (psycopg.errors.UndefinedTable, psycopg.errors.InsufficientPrivilege)

Row = tuple[str, str, str, str, str, float, str, float]

#: The pool says so on every failed reconnect (at 1, 2, 4, 8 ... s) and for every connection
#: it drops: in an outage, the first of these is enough (the sink gate tells the rest).
logging.getLogger("psycopg.pool").addFilter(OncePerOutage(
    (), ("error connecting in", "discarding closed connection", "discarding broken connection"),
    (),
))


class PostgresSink:
    def __init__(self, url: str, *, max_connections: int = 8, timeout_s: float = 10.0) -> None:
        self.url = url
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        # Autocommit: a write opens its one transaction itself; a count needs none.
        kwargs: dict[str, Any] = {"autocommit": True}
        # A direct connection first: a bad URL fails now with libpq's reason, where the pool
        # would retry in the background and report only a timeout.
        try:
            if "connect_timeout" not in conninfo_to_dict(url):
                kwargs["connect_timeout"] = _CONNECT_TIMEOUT_S
            with psycopg.connect(url, **kwargs) as conn:
                _create_table(conn)
        except psycopg.Error as exc:
            raise _opening_error(url, exc) from exc
        self._kwargs = kwargs
        # A connection was found dead since the last good write: the server may be gone, so
        # writes fail fast (SinkDown: they wait at the sink gate, which probes) instead of
        # each waiting ``timeout_s`` for the pool.
        self._lost = False
        self._pool = self._new_pool()
        self._pool_lock = threading.Lock()

    def _new_pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        # check: a connection is tried when taken (one round trip per batch written), so
        # those a server restart or failover closed are replaced instead of failing a write.
        return ConnectionPool(
            self.url, kwargs=self._kwargs, min_size=1, max_size=self._max_connections,
            open=True, timeout=self._timeout_s, name="fanout-sink",
            check=self._check,
        )

    def _check(self, conn: psycopg.Connection[Any]) -> None:
        try:
            ConnectionPool.check_connection(conn)
        except psycopg.Error:
            self._lost = True
            raise

    def write(self, records: Sequence[Record], run_id: str) -> int:
        if not records:
            return 0
        if self._lost:
            raise SinkDown(f"sink {redact(self.url)}: lost its connections (probing)")
        rows = _sorted_unique(records, run_id, time.time())
        pool = self._pool
        try:
            with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                cur.executemany(_UPSERT, rows)  # pipelined: one round trip for the batch
        except PoolTimeout:
            self._lost = pool is self._pool  # not when the probe replaced it meanwhile
            raise SinkDown(_unavailable(self.url, self._timeout_s)) from None
        except (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError,
                psycopg.NotSupportedError) as exc:
            if isinstance(exc, _NOT_ABOUT_DATA):
                raise SinkDown(f"sink {redact(self.url)}: {_one_line(exc)}") from exc
            raise SinkDataError(f"{type(exc).__name__}: {_one_line(exc)}") from exc
        except psycopg.Error as exc:  # OperationalError, InterfaceError: the connection
            self._lost = pool is self._pool
            raise SinkDown(f"sink {redact(self.url)}: {_one_line(exc)}") from exc
        self._lost = False  # the pool works again
        return len(records)

    def probe(self) -> None:
        """A connection of its own, not the pool's: the pool waits ``timeout_s`` for one.
        Once the server answers after a lost connection, the pool is made afresh: the old
        one retries connecting on a backoff of its own (1, 2, 4 ... 16 s), so after a
        20 s outage its next try could come 10 s after the server was back."""
        try:
            with psycopg.connect(self.url, **self._kwargs) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            raise SinkDown(f"sink {redact(self.url)}: {_one_line(exc)}") from exc
        if self._lost:
            with self._pool_lock:
                old, self._pool, self._lost = self._pool, self._new_pool(), False
            old.close(timeout=0)  # a write still waiting on it gets PoolClosed: SinkDown

    def count(self, run_id: str | None = None) -> int:
        try:
            with self._pool.connection() as conn:
                if run_id is None:
                    row = conn.execute("SELECT COUNT(*) FROM metrics").fetchone()
                else:
                    query = "SELECT COUNT(*) FROM metrics WHERE run_id = %s"
                    row = conn.execute(query, (run_id,)).fetchone()
        except PoolTimeout:
            raise SinkDown(_unavailable(self.url, self._timeout_s)) from None
        assert row is not None
        return int(row[0])

    def close(self) -> None:
        self._pool.close()


def _create_table(conn: psycopg.Connection[Any]) -> None:
    # Check first: CREATE ... IF NOT EXISTS needs CREATE on the schema even when the table
    # exists, and a sink's role may only have been granted rights on the table.
    if conn.execute("SELECT to_regclass('metrics')").fetchone() == (None,):
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_ID,))
            conn.execute(_SCHEMA)


def _sorted_unique(records: Sequence[Record], run_id: str, fetched_at: float) -> list[Row]:
    """One row per natural key, the last record winning (as when upserted in turn), in key
    order: the order every writer locks rows in."""
    latest = {(r.vendor, r.account, r.service, r.metric, r.day): r.value for r in records}
    return [(*key, value, run_id, fetched_at) for key, value in sorted(latest.items())]


def _unavailable(url: str, timeout_s: float) -> str:
    return f"sink {redact(url)}: no database connection within {timeout_s:g}s"


def _opening_error(url: str, exc: psycopg.Error) -> Exception:
    """A server that refuses this URL for good is a ConfigError; any other failure to open
    (nothing listening, a lost connection) is an outage."""
    text = f"cannot open sink {redact(url)}: {_one_line(exc)}"
    if isinstance(exc, psycopg.OperationalError) and \
            not any(phrase in str(exc) for phrase in _REFUSED_FOR_GOOD):
        return SinkDown(text)
    return ConfigError(text)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


