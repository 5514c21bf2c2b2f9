"""A vendor that fails: transient faults are retried until every item succeeds; permanent ones
fail at once, are listed, and are replayed into the same run once the vendor is fixed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import redis
from conftest import VendorHandle, WorkerFactory, sink_rows, wait_for
from test_harvest import END_DAY, expected_rows, finish, run_demo

from demo_vendor.data import fault_hit
from workers.engine.services import services
from workers.keys import queue_name
from workers.pipelines.demo import metric_days

LEAF = queue_name("demo", "metric_day")
FAN_OUT = [queue_name("demo", "accounts"), queue_name("demo", "services")]


def leaf_path(account: int, service: int, day: str) -> str:
    return f"/accounts/acct-{account:03d}/services/svc-{service:03d}/metrics?day={day}"


def fanout_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "producers.cli", *args], capture_output=True,
                          text=True, timeout=120, env=os.environ.copy())


def test_permanent_404s_fail_at_once_and_a_replay_finishes_the_run(
    vendor: VendorHandle, start_worker: WorkerFactory, sink_path: Path
) -> None:
    days = metric_days(END_DAY, 4)
    missing = [leaf_path(1, 2, days[0]), leaf_path(2, 3, days[3]), leaf_path(2, 1, days[1])]
    vendor.configure(not_found_paths=missing)
    start_worker()
    run_id = run_demo(vendor, days=4, http_retries=3)
    summary = finish(run_id)

    assert summary["status"] == "partial"
    leaf = summary["stages"]["metric_day"]
    assert (leaf["succeeded"], leaf["failed"], leaf["retried"]) == (21, 3, 0)
    assert summary["rows_written"] == 21
    # A 404 is permanent: neither the HTTP client nor the stage's retries asked again.
    by_path = vendor.stats()["by_path"]
    assert [by_path[p] for p in missing] == [1, 1, 1]

    listed = fanout_cli("failures", run_id, "--json")
    assert listed.returncode == 0, listed.stderr
    failures = json.loads(listed.stdout)
    assert sorted(leaf_path(int(f["item"]["account"][-3:]), int(f["item"]["service"][-3:]),
                            f["item"]["day"]) for f in failures.values()) == sorted(missing)
    for failure in failures.values():
        assert failure["error_type"] == "VendorHTTPError"
        assert "HTTP 404" in failure["message"]
        assert (failure["attempts"], failure["tries"]) == (1, 1)

    vendor.configure(not_found_paths=[])  # the vendor is fixed
    replayed = fanout_cli("replay", run_id, "--wait", "--json")
    assert replayed.returncode == 0, replayed.stderr
    assert "replaying 3 failed items" in replayed.stderr
    after = json.loads(replayed.stdout.strip().splitlines()[-1])
    assert after["run_id"] == run_id
    assert after["status"] == "succeeded"
    assert after["stages"]["metric_day"] == {
        "enqueued": 24, "succeeded": 24, "failed": 0, "cached": 0, "retried": 0,
        "throttled": 0, "skipped": 0,
    }
    assert after["rows_written"] == 24
    assert [r[:6] for r in sink_rows(sink_path)] == expected_rows(2, 3, 4)  # no duplicates
    assert [vendor.stats()["by_path"][p] for p in missing] == [2, 2, 2]
    assert services().ledger.view.failures(run_id) == {}
    again = fanout_cli("replay", run_id)
    assert again.returncode == 0 and "replaying 0 failed items" in again.stderr


def test_a_flaky_vendor_loses_nothing_and_every_retry_is_counted(
    vendor: VendorHandle, start_worker: WorkerFactory, redis_client: redis.Redis,
    sink_path: Path,
) -> None:
    rate, seed = 0.2, 11
    days = metric_days(END_DAY, 6)
    leaves = [leaf_path(a, s, d) for a in (1, 2) for s in range(1, 6) for d in days]
    erring = [p for p in leaves if fault_hit(seed, "err", p, rate)]
    stalling = [p for p in leaves if p not in erring][:2]
    assert len(erring) >= 5
    vendor.configure(accounts=2, services=5, seed=seed)
    # Fan out first, then turn the faults on for the leaves only.
    start_worker(queues=FAN_OUT)
    run_id = run_demo(vendor, days=6)  # http_retries=0: every failed try is a stage retry
    wait_for(lambda: redis_client.llen(LEAF) == 60, what="60 leaf messages queued")
    vendor.configure(error_rate=rate, error_times=1, stall_paths=stalling, stall_ms=5000,
                     burst_429={"count": 5, "retry_after_s": 0.3})
    start_worker({"FANOUT_HTTP_TIMEOUT_S": "1"}, queues=[LEAF], concurrency=4)
    # The stalled calls time out. Once both stall at the vendor (the only calls in flight for
    # seconds: a path's first call may have been one of the 429s instead), it stops stalling.
    def stalling_now() -> bool:  # still in flight 0.3 s later: a stall, not two quick calls
        if vendor.stats()["in_flight"] < len(stalling):
            return False
        time.sleep(0.3)
        return bool(vendor.stats()["in_flight"] >= len(stalling))

    wait_for(stalling_now, what="both paths stalling")
    vendor.configure(stall_paths=[])
    summary = finish(run_id)

    assert summary["status"] == "succeeded"
    leaf = summary["stages"]["metric_day"]
    assert (leaf["enqueued"], leaf["succeeded"], leaf["failed"]) == (60, 60, 0)
    assert summary["rows_written"] == 60
    assert [r[:6] for r in sink_rows(sink_path)] == expected_rows(2, 5, 6, seed=seed)
    stats = vendor.stats()
    assert stats["status"]["500"] == len(erring)  # each erring path failed once
    assert stats["status"]["429"] == 5
    # Every leaf request but the last of each item was a failed try, and each one a retry.
    requests = sum(stats["by_path"][p] for p in leaves)
    assert leaf["retried"] == requests - 60
    assert leaf["retried"] >= len(erring) + 5 + len(stalling)
