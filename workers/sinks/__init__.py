"""Sinks by URL: ``sqlite:///path`` (default) or ``postgresql://...``."""

from __future__ import annotations

import os
import sqlite3
import threading

from workers.redact import redact
from workers.settings import ConfigError, get_settings
from workers.sinks.base import NATURAL_KEY, Record, Sink, SinkDataError, SinkDown
from workers.sinks.sqlite import SqliteSink

__all__ = ["NATURAL_KEY", "Record", "Sink", "SinkDataError", "SinkDown", "check_sink",
           "check_sink_url", "get_sink", "open_sink", "size_pool"]


SCHEMES = ("sqlite:///", "postgresql://", "postgres://")


def check_sink_url(url: str) -> None:
    """A URL no sink serves is a ConfigError now, in the CLI, not a failure of every item."""
    if not url.startswith(SCHEMES):
        raise ConfigError(
            f"unsupported FANOUT_SINK_URL {redact(url)!r} (expected sqlite:///PATH or "
            "postgresql://...)"
        )


def check_sink(url: str) -> None:
    """Open the sink at ``url`` for real and close it: for a command that starts a run, a
    sink it cannot open now, for good or for a while, is a ConfigError (one line, exit 2)."""
    try:
        open_sink(url).close()
    except SinkDown as exc:
        raise ConfigError(str(exc)) from None


def open_sink(url: str) -> Sink:
    """The sink at ``url``. Raises ConfigError when it can never work as given, SinkDown
    when it cannot be reached now."""
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        try:
            return SqliteSink(path)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"cannot open sink {url}: {exc}") from None
    if url.startswith(("postgresql://", "postgres://")):
        try:  # imported on use: psycopg is an optional dependency (fanout[postgres])
            from workers.sinks.postgres import PostgresSink
        except ImportError as exc:  # psycopg or its pool missing, or psycopg without libpq
            if exc.name is not None and not exc.name.startswith("psycopg"):
                raise
            raise ConfigError(
                "a PostgreSQL sink needs psycopg 3 and psycopg_pool: "
                "pip install 'fanout[postgres]'"
            ) from exc
        return PostgresSink(url, max_connections=_PoolSize.connections)
    check_sink_url(url)
    raise AssertionError(f"no sink for {url!r}")  # pragma: no cover


#: The most connections a process's PostgreSQL sink opens: a batch holds one for its write
#: (a round trip), so a few serve thousands of threads, and 2 workers x 16 stay well inside
#: PostgreSQL's default of 100 clients.
MAX_SINK_CONNECTIONS = 16


class _PoolSize:
    connections = 8


def size_pool(threads: int) -> int:
    """Size the sink's connection pool for ``threads`` threads writing batches (a worker
    calls this at its start): one each, up to ``MAX_SINK_CONNECTIONS``; a writer that finds
    them all taken waits for one. Returns the size."""
    _PoolSize.connections = max(2, min(threads, MAX_SINK_CONNECTIONS))
    return _PoolSize.connections


_sinks: dict[tuple[str | None, str | None, int], Sink] = {}
_sinks_lock = threading.Lock()


def get_sink() -> Sink:
    """This process's sink (a forked worker child opens its own connection). Opened once:
    32 threads starting at once must not each open one (on a new SQLite file, their
    concurrent schema and WAL setup fail with "database is locked")."""
    # Keyed by what decides the URL, so the hot path reads two variables, not all settings.
    key = (os.environ.get("FANOUT_SINK_URL"), os.environ.get("FANOUT_HOME"), os.getpid())
    sink = _sinks.get(key)
    if sink is None:
        with _sinks_lock:
            sink = _sinks.get(key)
            if sink is None:
                sink = _sinks[key] = open_sink(get_settings().sink_url)
    return sink
