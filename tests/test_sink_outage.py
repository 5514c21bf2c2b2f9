"""The sink's database drops every connection mid-run (a PostgreSQL restart or failover): the
items whose rows could not be written did not fail, their messages go back, and the run ends
with exact rows well within the visibility timeout."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import psycopg
import redis
from conftest import VendorHandle, WorkerFactory, terminate_postgres_backends, wait_for
from test_harvest import expected_rows, finish, leaves_done, run_demo

from workers.keys import claimed, queue_name

LEAF = queue_name("demo", "metric_day")


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
    assert redis_client.zcard(claimed(LEAF)) == 0
