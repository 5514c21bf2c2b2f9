"""Batch maps and kill switches (seed 003) on real workers: exact counts of what ran and what
was skipped, switches checked after every batch including the last, at most N in flight, and
`fanout cancel` on a live run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import batch_pipelines
import pytest
from conftest import VendorHandle, WorkerFactory, wait_for

from producers.trigger import start_run
from workers.engine.services import services
from workers.policy.kill_switch import AnyFailed, FailureCount, FailureRate, to_spec

TESTS = Path(__file__).resolve().parent
WORKER_ENV = {"PYTHONPATH": str(TESTS), "FANOUT_PIPELINES": "batch_pipelines"}
ZERO = {"enqueued": 0, "succeeded": 0, "failed": 0, "cached": 0, "retried": 0, "throttled": 0,
        "skipped": 0}


def items(count: int, failing: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    return [{"n": n, "fail": n in failing} for n in range(1, count + 1)]


def run_batches(vendor: VendorHandle, roots: list[dict[str, Any]], size: int,
                switch: Any = None, **kwargs: Any) -> dict[str, Any]:
    run_id = start_run("batchtest", {"vendor_url": vendor.url}, roots=roots,
                       root_stage="fetch", batch_size=size, kill_switch=switch, **kwargs)
    ledger = services().ledger
    assert ledger.view.wait(run_id, 60) is not None, "the run did not finish"
    snap = ledger.view.snapshot(run_id, ["fetch"])
    assert snap is not None
    return {**snap.summary(), "results": ledger.view.results(run_id)}


def fetched(vendor: VendorHandle) -> list[int]:
    return sorted(int(p.rsplit("/", 1)[1]) for p in vendor.stats()["by_path"]
                  if p.startswith("/fib/"))


def test_batches_run_in_order_and_results_come_back_in_input_order(
    vendor: VendorHandle, start_worker: WorkerFactory
) -> None:
    start_worker(WORKER_ENV, concurrency=8)
    summary = run_batches(vendor, items(7), size=3, switch=AnyFailed())
    assert summary["status"] == "succeeded"
    assert summary["stages"]["fetch"] == {**ZERO, "enqueued": 7, "succeeded": 7}
    assert summary["results"] == [1, 1, 2, 3, 5, 8, 13]


@pytest.mark.parametrize(
    ("switch", "failing", "ran", "status_counts", "reason"),
    [
        # A failure in batch 1 of 4: batches 2-4 never reach a worker.
        (AnyFailed(), (2,), [1, 2], {"succeeded": 1, "failed": 1, "skipped": 6},
         "AnyFailed: 1 failed"),
        # A failure in the last batch still kills the run (prefecto never checks the last).
        (AnyFailed(), (8,), [1, 2, 3, 4, 5, 6, 7, 8], {"succeeded": 7, "failed": 1},
         "AnyFailed: 1 failed"),
        # Counted over the whole map: one failure in batch 1, one in batch 3.
        (FailureCount(2), (1, 6), [1, 2, 3, 4, 5, 6], {"succeeded": 4, "failed": 2, "skipped": 2},
         "FailureCount: 2 failed"),
        # 2 of 4 failed after batch 2 (0.5 > 0.3); batch 1 alone was under the sample size.
        (FailureRate(4, 0.3), (1, 3), [1, 2, 3, 4], {"succeeded": 2, "failed": 2, "skipped": 4},
         "FailureRate"),
        # A function of the counters, imported by the worker.
        (batch_pipelines.more_than_one_failed, (3, 4), [1, 2, 3, 4],
         {"succeeded": 2, "failed": 2, "skipped": 4}, "more_than_one_failed"),
    ],
)
def test_a_kill_switch_stops_the_batches_after_it_trips(
    vendor: VendorHandle, start_worker: WorkerFactory, switch: Any,
    failing: tuple[int, ...], ran: list[int], status_counts: dict[str, int], reason: str,
) -> None:
    start_worker(WORKER_ENV, concurrency=8)
    summary = run_batches(vendor, items(8, failing), size=2, switch=switch)
    assert summary["status"] == "killed"
    assert summary["stages"]["fetch"] == {**ZERO, "enqueued": 8, **status_counts}
    assert fetched(vendor) == ran
    assert reason in summary["stop_reason"]
    status = subprocess.run([sys.executable, "-m", "producers.cli", "status", summary["run_id"]],
                            capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert status.returncode == 1


def test_no_more_than_the_batch_size_is_ever_in_flight(
    vendor: VendorHandle, start_worker: WorkerFactory
) -> None:
    vendor.configure(latency_ms=150)
    start_worker(WORKER_ENV, concurrency=8)
    start_worker(WORKER_ENV, concurrency=8)
    summary = run_batches(vendor, items(12), size=3)
    assert summary["status"] == "succeeded"
    assert vendor.stats()["max_in_flight"] == 3


def test_a_batch_map_inside_a_stage(vendor: VendorHandle, start_worker: WorkerFactory) -> None:
    start_worker(WORKER_ENV, concurrency=8)
    spec = {"items": items(6, failing=(1,)), "size": 2, "switch": to_spec(AnyFailed())}
    run_id = start_run("batchtest", {"vendor_url": vendor.url}, roots=[spec],
                       root_stage="parent")
    ledger = services().ledger
    assert ledger.view.wait(run_id, 60) == "killed"
    snap = ledger.view.snapshot(run_id, ["parent", "fetch"])
    assert snap is not None
    assert snap.stages["parent"] == {**ZERO, "enqueued": 1, "succeeded": 1}
    assert snap.stages["fetch"] == {**ZERO, "enqueued": 6, "succeeded": 1, "failed": 1,
                                    "skipped": 4}
    assert fetched(vendor) == [1, 2]


def test_cancel_stops_a_live_run(vendor: VendorHandle, start_worker: WorkerFactory) -> None:
    vendor.configure(latency_ms=300)  # 40 items on 2 threads: 6 s of work
    worker = start_worker(WORKER_ENV, concurrency=2)
    run_id = start_run("batchtest", {"vendor_url": vendor.url}, roots=items(40),
                       root_stage="fetch")
    wait_for(lambda: len(fetched(vendor)) >= 4, what="a few items done")
    # The worker is paused while `fanout cancel` starts and runs, so the cancel cannot lose
    # the race with the work however slow the machine; it goes on once the run is cancelled.
    os.killpg(worker.pid, signal.SIGSTOP)
    try:
        cancel = subprocess.run([sys.executable, "-m", "producers.cli", "cancel", run_id],
                                capture_output=True, text=True, timeout=60,
                                env=os.environ.copy())
    finally:
        os.killpg(worker.pid, signal.SIGCONT)
    assert cancel.returncode == 0, cancel.stderr
    ledger = services().ledger
    assert ledger.view.wait(run_id, 60) == "cancelled"
    snap = ledger.view.snapshot(run_id, ["fetch"])
    assert snap is not None
    counts = snap.stages["fetch"]
    ran = len(fetched(vendor))
    assert ran < 40
    assert counts["succeeded"] == ran  # whatever ran was counted, the rest skipped unrun
    assert counts["succeeded"] + counts["skipped"] == counts["enqueued"] == 40
    assert snap.stop_reason == "cancelled by hand"
    again = subprocess.run([sys.executable, "-m", "producers.cli", "cancel", run_id],
                           capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert again.returncode == 2 and "already finished (cancelled)" in again.stderr


def test_batch_add_example_prints_what_the_seed_prints(redis_url: str) -> None:
    script = str(TESTS.parent / "examples" / "batch_add.py")
    env = {**os.environ, "FANOUT_REDIS_URL": redis_url}
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[3, 5, 7, 9]"
    killed = subprocess.run([sys.executable, script, "--kill"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert killed.returncode == 1
    assert "ended killed: AnyFailed: 1 failed" in killed.stderr
    assert "after 2 of 4 items" in killed.stderr


def test_fanout_run_starts_a_batch_map_with_a_kill_switch(
    vendor: VendorHandle, start_worker: WorkerFactory
) -> None:
    # Accounts 1 and 2 (batch 1) fail at once (404); the switch trips after that batch, and
    # accounts 3-5 are never fetched.
    vendor.configure(accounts=5, services=2,
                     not_found_paths=["/accounts/acct-001/services",
                                      "/accounts/acct-002/services"])
    start_worker(concurrency=4)
    result = subprocess.run(
        [sys.executable, "-m", "producers.cli", "run", "demo", "--days", "1", "--vendor-url",
         vendor.url, "--batch-size", "2", "--kill-switch", "failure_count:2", "--wait",
         "--json"], capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "killed"
    assert "FailureCount: 2 failed" in summary["stop_reason"]
    assert summary["stages"]["accounts"] == {**ZERO, "enqueued": 5, "failed": 2, "skipped": 3}
    assert summary["stages"]["services"] == ZERO
    assert sorted(p for p in vendor.stats()["by_path"] if p.endswith("/services")) == [
        "/accounts/acct-001/services", "/accounts/acct-002/services"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kill-switch", "any_failed"], "--kill-switch and --per-item need --batch-size"),
        (["--batch-size", "2", "--per-item"], "--per-item needs --kill-switch"),
        (["--batch-size", "2", "--kill-switch", "often"],
         "kill switch 'often': expected one of any_failed"),
        (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    ],
)
def test_bad_batch_options_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "producers.cli", "run", "demo", *args],
                            capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
