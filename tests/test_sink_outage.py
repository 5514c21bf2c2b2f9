"""Outages of the sink's database, on real workers: every connection dropped mid-run (a
PostgreSQL restart or failover), and the server unreachable for 20 s (a TCP proxy between the
sink and PostgreSQL stops listening). The items whose rows could not be written do not fail:
their batches wait at the worker's sink gate, sleeping, and the run ends with exact rows."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import redis
from conftest import (
    VendorHandle,
    WorkerFactory,
    claims_released,
    terminate_postgres_backends,
    wait_for,
)
from tcp_proxy import TcpProxy
from test_harvest import expected_rows, finish, leaves_done, run_demo

from workers.keys import SINK_DOWN, queue_name

LEAF = queue_name("demo", "metric_day")
OUTAGE_S = 20.0


def postgres_rows(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return sorted(conn.execute(
            "SELECT vendor, account, service, metric, day, value FROM metrics").fetchall())


def test_a_sink_that_drops_its_connections_mid_run_loses_and_fails_nothing(
    vendor: VendorHandle, start_worker: WorkerFactory, redis_client: redis.Redis,
    postgres_url: str, tmp_path: Path,
) -> None:
    vendor.configure(accounts=2, services=10, latency_ms=40)
    application = f"fanout-sink-{uuid.uuid4().hex[:8]}"
    sink_url = f"{postgres_url}&application_name={application}"
    # The default visibility timeout (300 s): what went back must not wait for it.
    start_worker({"FANOUT_SINK_URL": sink_url}, concurrency=8)
    run_id = run_demo(vendor, days=10)

    wait_for(lambda: leaves_done(run_id) >= 40, what="40 leaves done before the drop")
    assert terminate_postgres_backends(application) >= 1
    done_at_drop = leaves_done(run_id)
    assert done_at_drop < 200, "the run finished before the sink dropped its connections"

    summary = finish(run_id, timeout_s=60)
    assert summary["status"] == "succeeded"
    assert summary["stages"]["metric_day"]["succeeded"] == 200
    assert summary["stages"]["metric_day"]["failed"] == 0
    assert summary["rows_written"] == 200
    assert postgres_rows(postgres_url) == expected_rows(2, 10, 10)
    claims_released(redis_client, LEAF)


def cpu_s(session_id: int) -> float:
    """User + system CPU seconds of every process in a session (a worker and its children)."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id:  # field 6, the session, counted after the name
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def through(proxy: TcpProxy, url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"
                          if parts.username else f"127.0.0.1:{proxy.port}").geturl()


def test_a_sink_unreachable_for_20_s_is_waited_out_asleep_and_told_in_a_few_lines(
    vendor: VendorHandle, start_worker: WorkerFactory, redis_client: redis.Redis,
    postgres_url: str, tmp_path: Path,
) -> None:
    vendor.configure(accounts=2, services=10, latency_ms=40)
    server = urlsplit(postgres_url)
    proxy = TcpProxy(server.hostname or "127.0.0.1", server.port or 5432)
    try:
        worker = start_worker({"FANOUT_SINK_URL": through(proxy, postgres_url)},
                              concurrency=8, ready=True)
        log = tmp_path / "worker0.log"
        run_id = run_demo(vendor, days=10)
        wait_for(lambda: leaves_done(run_id) >= 40, what="40 leaves done before the outage")

        proxy.cut()
        cut_at = time.monotonic()
        lines_before = len(log.read_text().splitlines())
        wait_for(lambda: redis_client.get(SINK_DOWN), what="the outage noted in Redis")
        done_in_outage = leaves_done(run_id)
        assert done_in_outage < 200, "the run finished before the sink went away"
        # CPU over most of the outage, once every thread has met it.
        time.sleep(2)
        cpu_before, window_from = cpu_s(worker.pid), time.monotonic()
        time.sleep(max(0.0, cut_at + OUTAGE_S - 1 - time.monotonic()))
        cpu_used, window_s = cpu_s(worker.pid) - cpu_before, time.monotonic() - window_from
        assert leaves_done(run_id) == done_in_outage, "leaves counted without their rows"
        said = log.read_text().splitlines()[lines_before:]
        proxy.restore()

        summary = finish(run_id, timeout_s=120)
    finally:
        proxy.close()
    assert summary["status"] == "succeeded"
    assert summary["stages"]["metric_day"]["succeeded"] == 200
    assert summary["stages"]["metric_day"]["failed"] == 0
    assert summary["rows_written"] == 200
    assert postgres_rows(postgres_url) == expected_rows(2, 10, 10)
    claims_released(redis_client, LEAF)
    assert redis_client.get(SINK_DOWN) is None  # cleared when the sink came back

    assert cpu_used < 0.10 * window_s, f"{cpu_used:.2f} s CPU in {window_s:.1f} s of outage"
    text = log.read_text()
    # In the outage, besides Celery's INFO line per task received or ended: its own few.
    told = [line for line in said if "INFO/" not in line]
    assert len(told) <= 8, "\n".join(told)
    assert "Traceback" not in "\n".join(said)
    assert text.count("sink unreachable") == 1
    assert text.count("sink is back after") == 1


def test_fanout_run_wait_says_the_workers_cannot_write_to_the_sink(
    vendor: VendorHandle, start_worker: WorkerFactory, postgres_url: str,
) -> None:
    """Instead of "no worker is taking messages": the workers noted the outage in Redis."""
    vendor.configure(accounts=2, services=3, latency_ms=300)
    server = urlsplit(postgres_url)
    proxy = TcpProxy(server.hostname or "127.0.0.1", server.port or 5432)
    sink_url = through(proxy, postgres_url)
    said: list[str] = []
    try:
        start_worker({"FANOUT_SINK_URL": sink_url}, concurrency=4, ready=True)
        command = subprocess.Popen(
            [sys.executable, "-m", "producers.cli", "run", "demo", "--days", "2", "--wait",
             "--vendor-url", vendor.url, "--end-day", "2026-01-31"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "FANOUT_SINK_URL": sink_url},
        )
        assert command.stderr is not None
        reader = threading.Thread(target=lambda: said.extend(command.stderr or ()),
                                  daemon=True)
        reader.start()
        wait_for(lambda: any(" started" in line for line in said), what="the run started")
        proxy.cut()  # before any leaf (300 ms per vendor call) wrote its row
        wait_for(lambda: any("cannot write to the sink" in line for line in said),
                 what="the line about the sink")
        proxy.restore()
        assert command.wait(120) == 0, said
    finally:
        proxy.close()
    told = [line for line in said if "cannot write to the sink" in line]
    assert len(told) == 1
    assert told[0].startswith("workers are up but cannot write to the sink: ")
    assert f"postgresql://postgres@127.0.0.1:{proxy.port}/" in told[0]
    assert not any("no worker is taking messages" in line for line in said)
