"""The demo harvest on the other services a deployment may choose: the PostgreSQL sink and
RabbitMQ as the broker (Redis still holds the ledger). Each skips when the machine lacks the
service, unless FANOUT_REQUIRE_SERVICES is set (CI)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import suppress

import pytest
from conftest import VendorHandle, WorkerFactory, require_service, rows_at, wait_for
from kombu import Connection
from test_harvest import expected_rows, finish, run_demo

from workers.engine import services as services_module
from workers.keys import queue_name

RABBITMQ_URL = os.environ.get("FANOUT_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
STAGES = ("accounts", "services", "metric_day")


def test_demo_harvest_into_postgresql(
    vendor: VendorHandle, start_worker: WorkerFactory, postgres_url: str
) -> None:
    vendor.configure(accounts=3, services=4)
    start_worker({"FANOUT_SINK_URL": postgres_url}, concurrency=8)
    run_id = run_demo(vendor, days=5)
    summary = finish(run_id)
    assert summary["status"] == "succeeded"
    assert summary["rows_written"] == 60
    rows = rows_at(postgres_url)
    assert [tuple(r[:6]) for r in rows] == expected_rows(3, 4, 5)
    assert {r[6] for r in rows} == {run_id}

    again = finish(run_demo(vendor, days=5))  # upserts: the same 60 rows, new owner
    assert again["rows_written"] == 60
    assert [tuple(r[:6]) for r in rows_at(postgres_url)] == expected_rows(3, 4, 5)
    assert {r[6] for r in rows_at(postgres_url)} == {again["run_id"]}


def _depth(connection: Connection, queue: str) -> int:
    with connection.channel() as channel:
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except connection.channel_errors:
            return 0


@pytest.fixture
def rabbitmq(monkeypatch: pytest.MonkeyPatch) -> Iterator[Connection]:
    """RabbitMQ as this test's broker (producer side too), with fanout's demo queues empty."""
    connection = Connection(RABBITMQ_URL, connect_timeout=3)
    try:
        connection.ensure_connection(max_retries=1)
    except Exception as exc:
        require_service(f"RabbitMQ not reachable at {RABBITMQ_URL}: {exc}")
    for stage in STAGES:  # a queue never declared yet has nothing to purge
        with connection.channel() as channel, suppress(*connection.channel_errors):
            channel.queue_purge(queue_name("demo", stage))
    monkeypatch.setenv("FANOUT_BROKER_URL", RABBITMQ_URL)
    services_module._for_process.cache_clear()  # this process publishes to RabbitMQ now
    yield connection
    services_module._for_process.cache_clear()
    connection.release()


def test_demo_harvest_on_rabbitmq(
    vendor: VendorHandle, start_worker: WorkerFactory, rabbitmq: Connection
) -> None:
    vendor.configure(accounts=2, services=5)
    start_worker({"FANOUT_BROKER_URL": RABBITMQ_URL}, concurrency=8)
    summary = finish(run_demo(vendor, days=6))
    assert summary["status"] == "succeeded"
    assert summary["stages"]["metric_day"]["succeeded"] == 60
    assert summary["rows_written"] == 60


def test_a_message_lost_on_rabbitmq_is_published_again(
    vendor: VendorHandle, start_worker: WorkerFactory, rabbitmq: Connection, sink_path: str
) -> None:
    """A consumer is killed holding unacked messages, RabbitMQ requeues them, and they are
    purged: lost. The reaper finds the run stalled with its leaves on no queue and publishes
    them again from the ledger."""
    leaf = queue_name("demo", "metric_day")
    env = {"FANOUT_BROKER_URL": RABBITMQ_URL, "FANOUT_VISIBILITY_TIMEOUT_S": "2"}
    vendor.configure(accounts=2, services=3, latency_ms=300)
    start_worker(env, queues=[queue_name("demo", "accounts"), queue_name("demo", "services")])
    run_id = run_demo(vendor, days=4)
    wait_for(lambda: _depth(rabbitmq, leaf) == 24, what="24 leaves queued on RabbitMQ")
    victim = start_worker(env, queues=[leaf], concurrency=2)
    wait_for(lambda: vendor.stats()["by_endpoint"].get("metrics", 0) >= 1,
             what="the victim working on a leaf")
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    with rabbitmq.channel() as channel:
        purged = channel.queue_purge(leaf)
    assert purged and purged > 0
    vendor.configure(latency_ms=0)

    start_worker(env, queues=[leaf], concurrency=4)
    summary = finish(run_id, timeout_s=60)
    assert summary["status"] == "succeeded"
    assert summary["stages"]["metric_day"]["succeeded"] == 24
    assert summary["rows_written"] == 24
    assert [tuple(r[:6]) for r in rows_at(f"sqlite:///{sink_path}")] == expected_rows(2, 3, 4)
