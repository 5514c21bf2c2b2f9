"""Many calls in flight per worker process, and pools that cannot starve themselves: the
demo's ``async def`` stages run a claimed batch's items together on the worker's event loop,
bounded by ``--max-in-flight`` and the global limits, not by threads. Real Redis, real worker
processes, the demo vendor as a real HTTP server (its ``max_in_flight`` is what it saw)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import sync_pipelines  # noqa: F401  (registers demosync here, for start_run)
from conftest import POSTGRES_URL, VendorHandle, WorkerFactory, rows_at, sink_rows, wait_for
from test_cli import assert_one_line_error, fanout
from test_harvest import (
    END_DAY,
    expected_rows,
    finish,
    leaves_done,
    metric_fetches,
    run_demo,
    settled_fetches,
)

from producers.trigger import start_run
from workers import connections
from workers.connections import get_redis
from workers.limits import Limits
from workers.pipelines.demo import VENDOR_LIMIT
from workers.throttle import Throttle, Throttled

SYNC_WORKER_ENV = {"PYTHONPATH": str(Path(__file__).resolve().parent),
                   "FANOUT_PIPELINES": "sync_pipelines"}


def assert_exact(summary: dict[str, object], sink_path: Path, accounts: int, services: int,
                 days: int) -> None:
    """The run succeeded with every item counted once per stage and exactly its rows."""
    leaves = accounts * services * days
    stages = summary["stages"]
    assert summary["status"] == "succeeded"
    assert isinstance(stages, dict)
    assert [stages[s]["enqueued"] for s in ("accounts", "services", "metric_day")] == \
        [accounts, accounts * services, leaves]
    assert [stages[s]["succeeded"] for s in ("accounts", "services", "metric_day")] == \
        [accounts, accounts * services, leaves]
    assert all(stages[s]["failed"] == 0 for s in stages)
    assert summary["rows_written"] == leaves
    assert [r[:6] for r in sink_rows(sink_path)] == expected_rows(accounts, services, days)


def test_a_worker_with_1000_in_flight_finishes_2000_leaves_exact(
    vendor: VendorHandle, start_worker: WorkerFactory, sink_path: Path
) -> None:
    vendor.configure(accounts=4, services=25, latency_ms=200)
    start_worker(concurrency=32, max_in_flight=1000)
    summary = finish(run_demo(vendor, days=20), timeout_s=120)

    assert_exact(summary, sink_path, 4, 25, 20)
    fetched = metric_fetches(vendor)
    assert len(fetched) == 2000 and set(fetched.values()) == {1}
    # More calls were in flight at once than the worker has threads (32), never more than
    # its bound.
    assert 32 < vendor.stats()["max_in_flight"] <= 1000


def test_the_in_flight_bound_holds_and_is_filled_by_one_thread(
    vendor: VendorHandle, start_worker: WorkerFactory, sink_path: Path
) -> None:
    """One thread, a bound of 10: one claimed batch of 32 leaves runs 10 calls at a time."""
    vendor.configure(accounts=1, services=1, latency_ms=500)
    start_worker(concurrency=1, max_in_flight=10)
    summary = finish(run_demo(vendor, days=40), timeout_s=120)

    assert_exact(summary, sink_path, 1, 1, 40)
    assert vendor.stats()["max_in_flight"] == 10


def test_a_global_concurrency_limit_of_5_holds_across_1000_calls_in_flight(
    vendor: VendorHandle, start_worker: WorkerFactory, sink_path: Path
) -> None:
    Limits(get_redis()).set_limit(VENDOR_LIMIT, concurrency=5)
    vendor.configure(accounts=2, services=3, latency_ms=100)
    start_worker(concurrency=8, max_in_flight=1000)
    start_worker(concurrency=8, max_in_flight=1000)
    summary = finish(run_demo(vendor, days=20), timeout_s=150)

    assert_exact(summary, sink_path, 2, 3, 20)
    stats = vendor.stats()
    assert stats["max_in_flight"] <= 5
    # A call waiting for a slot never reached the vendor: each metric-day was asked once.
    fetched = metric_fetches(vendor)
    assert len(fetched) == 120 and set(fetched.values()) == {1}
    assert Limits(get_redis()).status(VENDOR_LIMIT)["in_use"] == 0  # every slot given back


def test_a_global_rate_limit_holds_and_throttles_what_would_wait_long(
    vendor: VendorHandle, start_worker: WorkerFactory, sink_path: Path
) -> None:
    """60 leaves against 2 calls a second: a call waits for its turn on the loop when it is
    near (up to 10 s: ``throttle.ASYNC_WAIT_S``), and the rest go back to the scheduler,
    counted ``throttled``, to run when the limit lets them; none reaches the vendor early.
    (At 2/s the last turns are 30 s off: some wait longer than 10 s even when a loaded machine
    spreads the leaves' first asks over 20 s; at 5/s a fresh-clone run throttled none.)"""
    Limits(get_redis()).set_limit(VENDOR_LIMIT, rate="2/s", burst=1)
    vendor.configure(accounts=2, services=3, rate_limit_rps=40)
    start_worker(concurrency=4, max_in_flight=1000)
    summary = finish(run_demo(vendor, days=10), timeout_s=150)

    assert_exact(summary, sink_path, 2, 3, 10)
    stages = summary["stages"]
    assert isinstance(stages, dict) and stages["metric_day"]["throttled"] >= 1
    stats = vendor.stats()
    assert stats["sent_429"] == 0 and stats["max_rps_1s"] <= 40
    fetched = metric_fetches(vendor)
    assert len(fetched) == 60 and set(fetched.values()) == {1}


def test_waiting_for_a_limit_does_not_block_the_event_loop(redis_url: str) -> None:
    """Calls at 1 a second: the second waits its turn (about 1 s) with ``asyncio.sleep``
    while the loop runs everything else; a third, due about 2 s away (more than the 1.5 s this
    throttle waits), is ``Throttled`` at once (its item runs again later). (At 2/s with 1 s
    the third was due 1.05 s away: on a loaded machine, 50 ms between the asks brought it
    within the second, and both waited.)"""
    throttle = Throttle(Limits(redis.Redis.from_url(redis_url, decode_responses=True)),
                        short_wait_s=1.5)
    throttle.limits.set_limit("loop-test", rate="1/s", burst=1)

    async def three_turns() -> tuple[int, float, BaseException]:
        ticks = 0

        async def ticking() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async def timed() -> float:
            started = time.monotonic()
            await throttle.take_async("loop-test")
            return time.monotonic() - started

        ticker = asyncio.create_task(ticking())
        await throttle.take_async("loop-test")
        # Which of the two asks Redis first is the executor's choice: one waits, one is held.
        turns = await asyncio.gather(timed(), timed(), return_exceptions=True)
        ticker.cancel()
        [waited] = [t for t in turns if isinstance(t, float)]
        [held] = [t for t in turns if isinstance(t, BaseException)]
        return ticks, waited, held

    ticks, waited, held = asyncio.run(three_turns())
    assert waited >= 0.5  # its turn, a second after the first (less the time since it)
    assert ticks >= 20  # the loop ticked all along
    assert isinstance(held, Throttled) and held.wait_s > 1.5


def test_an_async_worker_sigkilled_mid_run_loses_nothing(
    vendor: VendorHandle, start_worker: WorkerFactory, sink_path: Path
) -> None:
    vendor.configure(accounts=2, services=10, latency_ms=200)
    short_visibility = {"FANOUT_VISIBILITY_TIMEOUT_S": "10"}
    victim = start_worker(short_visibility, concurrency=8, max_in_flight=1000)
    run_id = run_demo(vendor, days=20)

    wait_for(lambda: leaves_done(run_id) >= 64, what="64 leaves done before the kill")
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    done_at_kill = leaves_done(run_id)
    assert done_at_kill < 400, "the run finished before the worker was killed"
    fetched_at_kill = settled_fetches(vendor)

    start_worker(short_visibility, concurrency=8, max_in_flight=1000)
    summary = finish(run_id, timeout_s=120)

    assert_exact(summary, sink_path, 2, 10, 20)
    fetched = metric_fetches(vendor)
    assert len(fetched) == 400
    # Fetched twice: what the dead worker had in flight, not yet recorded (a batch is
    # recorded whole once all its calls are back), and nothing it had not fetched yet.
    unfinished_at_kill = sum(fetched_at_kill.values()) - done_at_kill
    refetched = sum(fetched.values()) - 400
    assert unfinished_at_kill <= refetched <= unfinished_at_kill + 4  # (see test_harvest)
    assert max(fetched.values()) <= 3


@pytest.mark.parametrize("pipeline", ["demo", "demosync"])
def test_256_threads_complete_a_run_without_running_out_of_connections(
    vendor: VendorHandle, start_worker: WorkerFactory, sink_path: Path, tmp_path: Path,
    pipeline: str,
) -> None:
    """256 threads used to exhaust redis-py's pool of 100 and kombu's of 10: "Too many
    connections", claimed batches stranded until the reaper put them back. The pools now
    hold a connection per thread and wait when dry."""
    vendor.configure(accounts=4, services=25, latency_ms=50)
    start_worker(SYNC_WORKER_ENV, concurrency=256)
    params = {"days": 10, "end_day": END_DAY, "vendor_url": vendor.url, "http_retries": 0}
    summary = finish(start_run(pipeline, params), timeout_s=150)

    assert_exact(summary, sink_path, 4, 25, 10)
    log = (tmp_path / "worker0.log").read_text()
    assert "Too many connections" not in log
    assert "go back once Redis answers again" not in log


def test_256_threads_share_a_postgresql_sink_of_16_connections(
    vendor: VendorHandle, start_worker: WorkerFactory, postgres_url: str, tmp_path: Path,
) -> None:
    """Every thread writes its batches: the pool holds 16 connections, and a thread that finds
    them all taken waits for one (a wait is no outage: nothing goes back)."""
    vendor.configure(accounts=4, services=25, latency_ms=20)
    name = f"fanout-in-flight-{os.getpid()}"
    sink_url = f"{postgres_url}&application_name={name}"
    start_worker({"FANOUT_SINK_URL": sink_url}, concurrency=256)
    summary = finish(run_demo(vendor, days=10), timeout_s=150)

    assert summary["status"] == "succeeded"
    assert summary["rows_written"] == 1000
    assert [r[:6] for r in rows_at(postgres_url)] == expected_rows(4, 25, 10)
    log = (tmp_path / "worker0.log").read_text()
    assert "sink unreachable" not in log and "Too many connections" not in log
    import psycopg

    with psycopg.connect(POSTGRES_URL) as conn:
        [(opened,)] = conn.execute("SELECT count(*) FROM pg_stat_activity"
                                   " WHERE application_name = %s", (name,)).fetchall()
    assert 1 <= opened <= 16  # the worker's pool (its check at start is closed)


def test_a_dry_redis_pool_makes_threads_wait_not_fail(redis_url: str) -> None:
    """200 threads on a pool of 25 connections (a worker of 1 thread): each command waits for
    a connection, none fails."""
    connections.size_pools(1)
    pool = connections.pool_size()
    client = connections._client_for.__wrapped__(redis_url)
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(20):
                client.blpop(["in-flight-test:never"], timeout=0.01)  # holds its connection
        except redis.RedisError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert pool == 1 + connections.SPARE_CONNECTIONS
    assert len(client.connection_pool._connections) == pool  # every one used, no more
    connections.size_pools(100 - connections.SPARE_CONNECTIONS)  # back to the default


@pytest.mark.parametrize("bound", ["0", "5001"])
def test_a_bound_out_of_range_stops_the_worker_with_one_line(bound: str) -> None:
    worker = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers", "worker", "--pool", "solo",
         "--max-in-flight", bound],
        capture_output=True, text=True, timeout=120,
    )
    assert worker.returncode == 2
    ours = [line for line in worker.stderr.splitlines() if line.startswith("fanout")]
    assert ours == [f"fanout worker: --max-in-flight must be from 1 to 5,000, got {bound}"]
    assert "Traceback" not in worker.stderr


@pytest.mark.parametrize("option", ["--max-in-flight", "--concurrency"])
def test_fanout_worker_refuses_more_than_5000_per_process(option: str) -> None:
    assert_one_line_error(fanout("worker", option, "5001"), "at most 5,000 per process")
