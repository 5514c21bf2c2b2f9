"""The accounts -> services -> metric-days harvest, end to end: real Redis, real worker
processes, the demo vendor as a real HTTP server."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import redis
from conftest import VendorHandle, WorkerFactory, claims_released, sink_rows, wait_for

from demo_vendor.data import fault_hit, metric_value, service_metric
from producers.trigger import start_run
from workers.engine.services import services
from workers.keys import queue_name
from workers.pipelines.demo import metric_days
from workers.transport import RedisTransport

END_DAY = "2026-01-31"
METRICS = ("requests", "cpu_seconds", "storage_gb")


def run_demo(vendor: VendorHandle, days: int, **params: Any) -> str:
    return start_run(
        "demo",
        {"days": days, "end_day": END_DAY, "vendor_url": vendor.url, "http_retries": 0, **params},
    )


def finish(run_id: str, timeout_s: float = 90) -> dict[str, Any]:
    status = services().ledger.view.wait(run_id, timeout_s)
    assert status is not None, f"run {run_id} did not finish in {timeout_s}s"
    snap = services().ledger.view.snapshot(run_id, ["accounts", "services", "metric_day"])
    assert snap is not None
    return snap.summary()


def leaves_done(run_id: str) -> int:
    """Metric-days of the run succeeded so far."""
    snap = services().ledger.view.snapshot(run_id)
    return snap.stages.get("metric_day", {}).get("succeeded", 0) if snap else 0


def metric_fetches(vendor: VendorHandle) -> dict[str, int]:
    """Requests the vendor saw per metric-day (path and day)."""
    return {p: n for p, n in vendor.stats()["by_path"].items() if "/metrics?" in p}


def settled_fetches(vendor: VendorHandle) -> dict[str, int]:
    """``metric_fetches`` once the vendor has taken every request a dead worker sent: none in
    flight, and the same count at two reads (on a loaded machine the vendor may read the
    last requests off their sockets a little after the worker died)."""
    before = vendor.stats()
    for _ in range(60):
        time.sleep(0.5)
        now = vendor.stats()
        if now["in_flight"] == 0 and now["total"] == before["total"]:
            break
        before = now
    else:
        raise AssertionError("the vendor's requests never settled")
    return {p: n for p, n in now["by_path"].items() if "/metrics?" in p}


def expected_rows(accounts: int, services: int, days: int, seed: int = 7) -> list[tuple[Any, ...]]:
    rows = []
    for a in range(1, accounts + 1):
        account = f"acct-{a:03d}"
        for s in range(1, services + 1):
            service = f"svc-{s:03d}"
            metric = service_metric(seed, account, service, METRICS)
            for day in metric_days(END_DAY, days):
                rows.append(("demo", account, service, metric, day,
                             metric_value(seed, account, service, day)))
    return sorted(rows)


def test_small_harvest_writes_exact_rows_and_counts(
    vendor: VendorHandle, start_worker: WorkerFactory, sink_path: Path
) -> None:
    start_worker()
    run_id = run_demo(vendor, days=4)
    summary = finish(run_id)

    assert summary["status"] == "succeeded"
    stages = summary["stages"]
    assert [stages[s]["enqueued"] for s in ("accounts", "services", "metric_day")] == [2, 6, 24]
    assert [stages[s]["succeeded"] for s in ("accounts", "services", "metric_day")] == [2, 6, 24]
    assert all(stages[s]["failed"] == 0 for s in stages)
    assert summary["rows_written"] == 24

    rows = sink_rows(sink_path)
    assert [r[:6] for r in rows] == expected_rows(2, 3, 4)
    assert {r[6] for r in rows} == {run_id}

    stats = vendor.stats()
    assert stats["by_endpoint"]["accounts"] == 1
    assert stats["by_endpoint"]["services"] == 2
    assert stats["by_endpoint"]["metrics"] == 24


def test_nested_fan_out_follows_every_page(
    vendor: VendorHandle, start_worker: WorkerFactory, sink_path: Path
) -> None:
    vendor.configure(accounts=3, services=45, page_size=20)
    start_worker(concurrency=8)
    summary = finish(run_demo(vendor, days=2))

    assert summary["status"] == "succeeded"
    assert summary["stages"]["services"]["enqueued"] == 3 * 45
    assert summary["stages"]["metric_day"]["succeeded"] == 3 * 45 * 2
    assert len(sink_rows(sink_path)) == 270
    # 45 services at 20 a page: 3 pages per account, one loop iteration each, fetched once.
    assert summary["stages"]["accounts"]["iterations"] == 9
    assert summary["stages"]["accounts"]["succeeded"] == 3
    assert vendor.stats()["by_endpoint"]["services"] == 9


def test_worker_sigkilled_mid_run_loses_nothing(
    vendor: VendorHandle, start_worker: WorkerFactory, sink_path: Path
) -> None:
    vendor.configure(accounts=2, services=10, latency_ms=40)
    # Short, so the dead worker's claimed messages come back soon; long enough that a live
    # worker's claimed batch (up to 32 calls of 40 ms) never outlasts it on a loaded machine
    # and runs twice, which would make the refetch count below inexact.
    short_visibility = {"FANOUT_VISIBILITY_TIMEOUT_S": "10"}
    # 8 calls in flight: the async leaves would otherwise all be in flight at once, and the
    # run could end before the kill lands.
    victim = start_worker(short_visibility, concurrency=8, max_in_flight=8)
    run_id = run_demo(vendor, days=10)

    wait_for(lambda: leaves_done(run_id) >= 40, what="40 leaves done before the kill")
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    done_at_kill = leaves_done(run_id)
    assert done_at_kill < 200, "the run finished before the worker was killed"
    fetched_at_kill = settled_fetches(vendor)

    start_worker(short_visibility, concurrency=8)
    summary = finish(run_id)

    assert summary["status"] == "succeeded"
    assert summary["stages"]["metric_day"]["enqueued"] == 200
    assert summary["stages"]["metric_day"]["succeeded"] == 200
    assert summary["rows_written"] == 200
    rows = sink_rows(sink_path)
    assert [r[:6] for r in rows] == expected_rows(2, 10, 10)
    # Every metric-day was fetched; fetched twice is exactly what the killed worker had
    # fetched without finishing it (a worker skips an item already terminal before any call),
    # and nothing it had not fetched yet.
    fetched = metric_fetches(vendor)
    assert len(fetched) == 200
    assert all(n == 1 for n in fetched_at_kill.values())
    unfinished_at_kill = sum(fetched_at_kill.values()) - done_at_kill
    # Exact: a message kombu's sweep put back and the survivor took again keeps its delivery
    # tag, and reaping the dead worker leaves it with the survivor (broker.QoS
    # restore_unless_held); a services item the dead worker had not finished runs again and
    # publishes none of its fan-out a second time (runner.publish_children).
    assert sum(fetched.values()) - 200 == unfinished_at_kill
    assert max(fetched.values()) <= 2


def test_worker_stopped_mid_run_finishes_its_work_and_refetches_nothing(
    vendor: VendorHandle, start_worker: WorkerFactory, redis_client: redis.Redis,
    sink_path: Path,
) -> None:
    """A deploy's SIGTERM: the worker finishes what it runs (its claimed batches included),
    gives back what it had only prefetched, and exits 0; a new worker ends the run and no
    metric-day is fetched twice."""
    vendor.configure(accounts=2, services=10, latency_ms=40)
    stopping = start_worker(concurrency=8, max_in_flight=8)  # as above: the stop lands mid-run
    run_id = run_demo(vendor, days=10)

    wait_for(lambda: leaves_done(run_id) >= 40, what="40 leaves done before the stop")
    stopping.send_signal(signal.SIGTERM)
    assert stopping.wait(timeout=60) == 0
    done_at_stop = leaves_done(run_id)
    assert done_at_stop < 200, "the run finished before the worker was stopped"
    claims_released(redis_client, queue_name("demo", "metric_day"))

    start_worker(concurrency=8)
    summary = finish(run_id)

    assert summary["status"] == "succeeded"
    assert summary["stages"]["metric_day"]["succeeded"] == 200
    assert summary["rows_written"] == 200
    assert [r[:6] for r in sink_rows(sink_path)] == expected_rows(2, 10, 10)
    fetched = {p: n for p, n in vendor.stats()["by_path"].items() if "/metrics?" in p}
    assert len(fetched) == 200
    assert set(fetched.values()) == {1}


def test_message_delivered_twice_is_counted_once(
    vendor: VendorHandle,
    start_worker: WorkerFactory,
    redis_client: redis.Redis,
    sink_path: Path,
) -> None:
    # Fan out with a worker that does not consume the leaf queue, then duplicate every leaf
    # message on the queue before a leaf worker starts.
    leaf_queue = queue_name("demo", "metric_day")
    start_worker(queues=[queue_name("demo", "accounts"), queue_name("demo", "services")])
    run_id = run_demo(vendor, days=4)
    wait_for(lambda: redis_client.llen(leaf_queue) == 24, what="24 leaf messages queued")
    messages = redis_client.lrange(leaf_queue, 0, -1)
    redis_client.rpush(leaf_queue, *messages)
    assert redis_client.llen(leaf_queue) == 48

    # One thread: each copy runs after its original has finished.
    start_worker(queues=[leaf_queue], concurrency=1)
    summary = finish(run_id)

    assert summary["status"] == "succeeded"
    assert summary["stages"]["metric_day"] == {
        "enqueued": 24, "succeeded": 24, "failed": 0, "cached": 0,
        "retried": 0, "throttled": 0, "skipped": 0,
    }
    assert summary["rows_written"] == 24
    assert len(sink_rows(sink_path)) == 24
    wait_for(lambda: redis_client.llen(leaf_queue) == 0, what="the copies consumed")
    # The copies were recognised before any HTTP call: the vendor saw each metric-day once.
    assert vendor.stats()["by_endpoint"]["metrics"] == 24


def _lists_cleanly(seed: int, rate: float) -> bool:
    """Whether, for this seed, the listings (accounts, services) are free of injected 5xx."""
    listings = ["/accounts", "/accounts/acct-001/services", "/accounts/acct-002/services"]
    return not any(fault_hit(seed, "err", path, rate) for path in listings)


def test_vendor_5xx_fails_only_those_items(
    vendor: VendorHandle, start_worker: WorkerFactory, sink_path: Path
) -> None:
    rate = 0.2
    seed = next(s for s in range(1, 100) if _lists_cleanly(s, rate))
    vendor.configure(accounts=2, services=5, seed=seed, error_rate=rate, error_times=0)
    faulty = {
        (f"acct-{a:03d}", f"svc-{s:03d}", day)
        for a in (1, 2) for s in range(1, 6) for day in metric_days(END_DAY, 6)
        if fault_hit(seed, "err",
                     f"/accounts/acct-{a:03d}/services/svc-{s:03d}/metrics?day={day}", rate)
    }
    assert 0 < len(faulty) < 60

    start_worker(concurrency=8)
    run_id = run_demo(vendor, days=6)
    summary = finish(run_id)

    assert summary["status"] == "partial"
    leaf = summary["stages"]["metric_day"]
    assert leaf["failed"] == len(faulty)
    assert leaf["succeeded"] == 60 - len(faulty)
    assert summary["rows_written"] == 60 - len(faulty)
    assert {(r[1], r[2], r[4]) for r in sink_rows(sink_path)}.isdisjoint(faulty)

    failures = services().ledger.view.failures(run_id)
    assert {(f["item"]["account"], f["item"]["service"], f["item"]["day"])
            for f in failures.values()} == faulty
    for failure in failures.values():
        assert failure["stage"] == "metric_day"
        assert failure["error_type"] == "VendorHTTPError"
        assert "HTTP 500" in failure["message"]
        # The stage's 3 retries (no HTTP retries in this run): four tries each.
        assert (failure["attempts"], failure["tries"]) == (4, 4)
        assert failure["first_failed_at"] < failure["last_failed_at"]
    assert vendor.stats()["status"]["500"] == 4 * len(faulty)
    assert summary["stages"]["metric_day"]["retried"] == 3 * len(faulty)


def test_claimed_batch_of_a_dead_worker_goes_back_on_the_queue(
    vendor: VendorHandle, start_worker: WorkerFactory, redis_client: redis.Redis,
    sink_path: Path,
) -> None:
    """A worker that claimed leaf messages for a batch and died never released them: the
    reaper puts them back once the claimer's last heartbeat is 10 s old (this test process
    claims and never beats), and nothing is lost or doubled."""
    leaf_queue = queue_name("demo", "metric_day")
    start_worker(queues=[queue_name("demo", "accounts"), queue_name("demo", "services")])
    run_id = run_demo(vendor, days=4)
    wait_for(lambda: redis_client.llen(leaf_queue) == 24, what="24 leaf messages queued")
    taken = RedisTransport(redis_client, 600).claim(leaf_queue, 10)  # ... and "dies"
    assert len(taken) == 10 and redis_client.llen(leaf_queue) == 14

    start_worker({"FANOUT_VISIBILITY_TIMEOUT_S": "2"}, queues=[leaf_queue])
    summary = finish(run_id)
    assert summary["status"] == "succeeded"
    assert summary["stages"]["metric_day"]["succeeded"] == 24
    assert [r[:6] for r in sink_rows(sink_path)] == expected_rows(2, 3, 4)
    claims_released(redis_client, leaf_queue)
    assert vendor.stats()["by_endpoint"]["metrics"] == 24
