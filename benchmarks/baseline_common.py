"""What the hand-written baselines (Celery, Dramatiq) share besides their leaf work
(``benchmarks/leaf.py``): the Redis completion counter, the driver's accounts listing, the sink
row count, and the ``client`` leaf kind's pieces: one ``httpx.Client`` per process shared by its
threads, and a plain ``INSERT OR REPLACE`` per row, committed on its own (what the baselines did
before they ran fanout's own leaf code). Nothing here imports ``workers``.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import httpx
import redis

_SCHEMA = """
CREATE TABLE IF NOT EXISTS metrics (
    vendor TEXT NOT NULL, account TEXT NOT NULL, service TEXT NOT NULL, metric TEXT NOT NULL,
    day TEXT NOT NULL, value REAL NOT NULL, run_id TEXT NOT NULL,
    PRIMARY KEY (vendor, account, service, metric, day)
)
"""
_INSERT = (
    "INSERT OR REPLACE INTO metrics (vendor, account, service, metric, day, value, run_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def done_key(tag: str) -> str:
    return f"bench:{tag}:done"


def failed_key(tag: str) -> str:
    return f"bench:{tag}:failed"


@functools.cache
def _http_for(pid: int) -> httpx.Client:
    # The same pool limits as fanout's client (workers/http.py).
    return httpx.Client(
        timeout=httpx.Timeout(30.0, connect=5.0),
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=128),
    )


def http_client() -> httpx.Client:
    return _http_for(os.getpid())


#: Redis connections a baseline process may open per pool (the harness sets it from the
#: worker's concurrency): redis-py's default cap, 100, is fewer than a gevent worker's greenlets
#: calling at once, and a pool past its cap raises "Too many connections".
REDIS_MAX_CONNECTIONS_ENV = "BENCH_REDIS_MAX_CONNECTIONS"


def redis_max_connections() -> int | None:
    value = os.environ.get(REDIS_MAX_CONNECTIONS_ENV)
    return int(value) if value else None


@functools.cache
def _redis_for(pid: int, url: str) -> redis.Redis:
    return redis.Redis.from_url(url, max_connections=redis_max_connections())


def redis_client() -> redis.Redis:
    return _redis_for(os.getpid(), os.environ["FANOUT_REDIS_URL"])


def get_json(url: str, client: httpx.Client | None = None, **params: str) -> Any:
    response = (client or http_client()).get(url, params=params or None)
    response.raise_for_status()
    return response.json()


def list_accounts(vendor_url: str, client: httpx.Client | None = None) -> list[str]:
    return [a["id"] for a in get_json(f"{vendor_url}/accounts", client)["accounts"]]


def metric_days(end_day: str, days: int) -> list[str]:
    end = dt.date.fromisoformat(end_day)
    return [(end - dt.timedelta(days=back)).isoformat() for back in range(days - 1, -1, -1)]


def fetch_metric(
    vendor_url: str, item: dict[str, str], client: httpx.Client | None = None
) -> tuple[str, str, str, str, str, float]:
    path = f"{vendor_url}/accounts/{item['account']}/services/{item['service']}/metrics"
    data = get_json(path, client, day=item["day"])
    return ("demo", item["account"], item["service"], data["metric"], item["day"],
            float(data["value"]))


_local = threading.local()


def connect_sink(path: str | Path) -> sqlite3.Connection:
    """Autocommit connection, WAL, synchronous=NORMAL (as fanout's sink)."""
    conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(_SCHEMA)
    return conn


def thread_sink() -> sqlite3.Connection:
    """One connection per thread (and per process: a forked child opens its own)."""
    key = (os.getpid(), threading.get_ident())
    conn: sqlite3.Connection | None = getattr(_local, "conn", None)
    if conn is None or getattr(_local, "key", None) != key:
        conn = connect_sink(os.environ["BENCH_BASELINE_SINK"])
        _local.conn, _local.key = conn, key
    return conn


def write_row(conn: sqlite3.Connection, row: tuple[Any, ...], tag: str) -> None:
    """One plain INSERT OR REPLACE, committed on its own (autocommit)."""
    conn.execute(_INSERT, (*row, tag))


def sink_count(path: str | Path, tag: str) -> int:
    if not Path(path).exists():
        return 0
    with sqlite3.connect(path, timeout=60) as conn:
        row = conn.execute("SELECT COUNT(*) FROM metrics WHERE run_id = ?", (tag,)).fetchone()
    return int(row[0])
