"""The leaf work of the hand-written baselines (Celery, Dramatiq) and of the naive loop, in three
kinds, chosen per worker process by ``BENCH_LEAF``:

- ``fanout`` (the default): exactly fanout's leaf work. The GET is fanout's own
  ``workers.http.request_json`` (its per-thread keep-alive transport,
  ``workers/http_transport.py``, no ``httpx.Client``, retries 0 as in the benchmark's runs),
  and the row goes through fanout's own
  ``workers.sinks.sqlite.SqliteSink`` (WAL, group commit across threads, upsert), one sink per
  process, as fanout's ``get_sink()`` opens it. What fanout adds around a leaf (ledger, batched
  consumption, task events) is framework cost and stays out of this module.
- ``client``: what the baselines did before, kept so the HTTP client's and sink's share is
  visible: one ``httpx.Client`` per process shared by its threads, and a plain
  ``INSERT OR REPLACE`` committed on its own (``baseline_common``).
- ``sleep``: no HTTP and no sink in the leaf, only ``time.sleep`` for the vendor's latency:
  framework cost alone. Listing (accounts, services) still goes to the vendor, as in fanout's
  sleep-leaf pipeline (``benchmarks/sleep_pipeline.py``), so the fan-out above the leaves is
  the same work in every kind.

Every leaf then INCRs the run's completion counter (``baseline_common.done_key``), which the
driver watches (a failed leaf INCRs ``failed_key``). Importing ``workers.http`` and
``workers.sinks.sqlite`` loads neither fanout's Celery app nor its engine.

Under gevent (Celery's ``-P gevent``, ``dramatiq-gevent``) these same functions run with the
standard library monkeypatched: ``request_json``'s per-thread transport becomes one per
greenlet, the sink's locks cooperative. Async actors run ``harvest_leaf_async`` instead: the
same request and the same ``SqliteSink.write`` (called on the event loop: it is not a coroutine),
with the GET on one ``aiohttp.ClientSession`` per process (no connection cap: the worker's
in-flight bound is the cap), the counter on ``redis.asyncio``, and ``asyncio.sleep`` for the
sleep kind. fanout's ``request_json`` has no async form yet.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from benchmarks import baseline_common as common
from workers.http import request_json, request_json_async
from workers.sinks.base import Record
from workers.sinks.sqlite import SqliteSink

LEAF_ENV = "BENCH_LEAF"
SINK_ENV = "BENCH_BASELINE_SINK"
LATENCY_ENV = "BENCH_LATENCY_MS"
DEFAULT_LATENCY_MS = 20.0
#: The demo vendor's latency in the harvest suite (``python -m benchmarks --latency-ms``, which
#: sets ``BENCH_LATENCY_MS`` for the driver and every worker it starts); the sleep leaf sleeps it.
LATENCY_MS = float(os.environ.get(LATENCY_ENV) or DEFAULT_LATENCY_MS)
SLEEP_S = LATENCY_MS / 1000
KINDS = {
    "fanout": "fanout's leaf code: request_json (per-thread transport) + SqliteSink",
    "client": "shared httpx.Client + plain INSERT (autocommit)",
    "sleep": f"sleep {LATENCY_MS:g} ms (no HTTP, no sink)",
}


def leaf_kind() -> str:
    kind = os.environ.get(LEAF_ENV) or "fanout"
    if kind not in KINDS:
        raise ValueError(f"{LEAF_ENV}={kind!r}: expected one of {', '.join(KINDS)}")
    return kind


def get_json(url: str, **query: str) -> Any:
    """A vendor GET on this leaf kind's HTTP path (``client``: the shared httpx.Client;
    otherwise fanout's ``request_json``, as the demo pipeline calls it, without a limit)."""
    if leaf_kind() == "client":
        return common.get_json(url, None, **query)
    return request_json("GET", url, params=query or None, retries=0)


def list_services(vendor_url: str, account: str) -> list[dict[str, str]]:
    """Every service of one account, through all cursor pages."""
    services: list[dict[str, str]] = []
    query: dict[str, str] = {}
    while True:
        page = get_json(f"{vendor_url}/accounts/{account}/services", **query)
        services += [
            {"account": account, "service": s["id"], "metric": s["metric"]}
            for s in page["services"]
        ]
        if not page.get("next_cursor"):
            return services
        query = {"cursor": page["next_cursor"]}


# -- the three leaves ---------------------------------------------------------------------------

_sinks: dict[tuple[int, str], SqliteSink] = {}
_sinks_lock = threading.Lock()


def process_sink(path: str | None = None) -> SqliteSink:
    """This process's SqliteSink (a forked child opens its own), opened once under a lock as
    fanout's ``get_sink()`` does: 32 threads must not each open one."""
    key = (os.getpid(), path or os.environ[SINK_ENV])
    sink = _sinks.get(key)
    if sink is None:
        with _sinks_lock:
            sink = _sinks.get(key)
            if sink is None:
                sink = _sinks[key] = SqliteSink(key[1])
    return sink


def fetch_record(vendor_url: str, item: dict[str, str]) -> Record:
    """The demo pipeline's ``metric_day`` stage body (``workers/pipelines/demo.py``)."""
    path = f"{vendor_url}/accounts/{item['account']}/services/{item['service']}/metrics"
    data = request_json("GET", path, params={"day": item["day"]}, retries=0)
    return Record("demo", item["account"], item["service"], data["metric"], item["day"],
                  float(data["value"]))


async def fetch_record_async(vendor_url: str, item: dict[str, str]) -> Record:
    """``fetch_record`` as the demo's async ``metric_day`` makes it (``request_json_async``),
    for a baseline running async leaves (an asyncio actor)."""
    path = f"{vendor_url}/accounts/{item['account']}/services/{item['service']}/metrics"
    data = await request_json_async("GET", path, params={"day": item["day"]}, retries=0)
    return Record("demo", item["account"], item["service"], data["metric"], item["day"],
                  float(data["value"]))


def fanout_leaf(tag: str, vendor_url: str, item: dict[str, str]) -> None:
    process_sink().write([fetch_record(vendor_url, item)], tag)


def client_leaf(tag: str, vendor_url: str, item: dict[str, str]) -> None:
    common.write_row(common.thread_sink(), common.fetch_metric(vendor_url, item), tag)


def sleep_leaf(tag: str, vendor_url: str, item: dict[str, str]) -> None:
    time.sleep(SLEEP_S)


_LEAVES = {"fanout": fanout_leaf, "client": client_leaf, "sleep": sleep_leaf}
ASYNC_KINDS = ("fanout", "sleep")


def harvest_leaf(tag: str, vendor_url: str, item: dict[str, str]) -> None:
    """The leaf task body of both baselines: this process's leaf kind, then the counter."""
    try:
        _LEAVES[leaf_kind()](tag, vendor_url, item)
    except Exception:
        common.redis_client().incr(common.failed_key(tag))
        raise
    common.redis_client().incr(common.done_key(tag))


# -- the async leaves (Dramatiq's async actors) ---------------------------------------------------

_aio: dict[int, tuple[Any, Any]] = {}  # pid -> (aiohttp session, redis.asyncio client)


def _aio_clients() -> tuple[Any, Any]:
    """This process's aiohttp session and async Redis client, made on the event loop's first
    call (Dramatiq runs every async actor of a process on one loop)."""
    clients = _aio.get(os.getpid())
    if clients is None:
        import aiohttp
        import redis.asyncio

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),  # the worker's threads bound it
            timeout=aiohttp.ClientTimeout(total=30, connect=5),
        )
        clients = _aio[os.getpid()] = (session, redis.asyncio.Redis.from_url(
            os.environ["FANOUT_REDIS_URL"], max_connections=common.redis_max_connections()))
    return clients


async def fetch_record_aiohttp(vendor_url: str, item: dict[str, str]) -> Record:
    """``fetch_record`` on aiohttp (fanout's ``request_json`` has no async form on this
    branch; where it has one, an async baseline leaf should call it instead)."""
    session, _ = _aio_clients()
    path = f"{vendor_url}/accounts/{item['account']}/services/{item['service']}/metrics"
    async with session.get(path, params={"day": item["day"]}) as response:
        response.raise_for_status()
        data = await response.json()
    return Record("demo", item["account"], item["service"], data["metric"], item["day"],
                  float(data["value"]))


async def harvest_leaf_async(tag: str, vendor_url: str, item: dict[str, str]) -> None:
    """``harvest_leaf`` for an async actor: the fanout kind (an aiohttp GET, the row through
    this process's SqliteSink) or the sleep kind, then the counter."""
    import asyncio

    kind = leaf_kind()
    if kind not in ASYNC_KINDS:
        raise ValueError(f"{LEAF_ENV}={kind!r} has no async form")
    _, counter = _aio_clients()
    try:
        if kind == "sleep":
            await asyncio.sleep(SLEEP_S)
        else:
            process_sink().write([await fetch_record_aiohttp(vendor_url, item)], tag)
    except Exception:
        await counter.incr(common.failed_key(tag))
        raise
    await counter.incr(common.done_key(tag))
