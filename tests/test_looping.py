"""Looping tasks (seed 002): each iteration its own message, retried alone, resumed after a
SIGKILL from the last completed iteration, bounded by max_iterations, and delayed without
broker ETAs. Real Redis, real worker processes, the demo vendor as a real server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import loop_pipelines  # noqa: F401  (registers the looptest pipeline in this process)
from conftest import VendorHandle, WorkerFactory, sink_rows, wait_for

from demo_vendor.data import fib
from producers.trigger import start_run
from workers.engine.services import services

TESTS_DIR = str(Path(__file__).resolve().parent)
ROOT = Path(__file__).resolve().parents[1]
LOOP_WORKER_ENV = {"PYTHONPATH": TESTS_DIR, "FANOUT_PIPELINES": "loop_pipelines"}


def run_stage(stage: str, roots: list[Any], vendor: VendorHandle, **params: Any) -> str:
    return start_run("looptest", {"vendor_url": vendor.url, **params}, roots=roots,
                     root_stage=stage)


def finish(run_id: str, timeout_s: float = 90) -> dict[str, Any]:
    view = services().ledger.view
    assert view.wait(run_id, timeout_s) is not None, f"run {run_id} did not finish"
    snap = view.snapshot(run_id)
    assert snap is not None
    return snap.summary()


def fib_requests(vendor: VendorHandle) -> dict[int, int]:
    by_path = vendor.stats()["by_path"]
    return {int(p.rsplit("/", 1)[1]): c for p, c in by_path.items() if p.startswith("/fib/")}


def test_failed_iteration_is_retried_alone(
    vendor: VendorHandle, start_worker: WorkerFactory
) -> None:
    vendor.configure(fail_paths={"/fib/5": 1})
    start_worker(LOOP_WORKER_ENV)
    run_id = run_stage("fib", [100], vendor)
    summary = finish(run_id)

    assert summary["status"] == "succeeded"
    assert services().ledger.view.results(run_id) == [89]
    # Iterations 1..4 once each, iteration 5 twice (its retry), 6..12 once.
    assert fib_requests(vendor) == {n: (2 if n == 5 else 1) for n in range(1, 13)}
    stage = summary["stages"]["fib"]
    assert (stage["enqueued"], stage["succeeded"], stage["retried"]) == (1, 1, 1)
    assert stage["iterations"] == 12


def test_looping_combines_with_mapping(vendor: VendorHandle, start_worker: WorkerFactory) -> None:
    start_worker(LOOP_WORKER_ENV)
    run_id = run_stage("fib", [10, 100, 1000, 1500], vendor)
    summary = finish(run_id)
    assert summary["status"] == "succeeded"
    assert services().ledger.view.results(run_id) == [8, 89, 987, 987]
    # The largest fib below M is fib(k), found by asking for fib(1)..fib(k+1): k+1 iterations.
    assert summary["stages"]["fib"]["iterations"] == 7 + 12 + 17 + 17


def test_sigkilled_loop_resumes_from_last_completed_iteration(
    vendor: VendorHandle, start_worker: WorkerFactory
) -> None:
    vendor.configure(latency_ms=150)
    short_visibility = {**LOOP_WORKER_ENV, "FANOUT_VISIBILITY_TIMEOUT_S": "3"}
    victim = start_worker(short_visibility)
    target = fib(25)  # the loop asks for fib(1)..fib(26)
    run_id = run_stage("fib", [target], vendor)
    ledger = services().ledger

    def iteration() -> int:
        states = ledger.loops.states(run_id)
        return max((s["iteration"] for s in states.values()), default=1)

    wait_for(lambda: iteration() >= 6, what="six iterations before the kill")
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    resumed_at = iteration()
    assert resumed_at < 26, "the loop finished before the kill"

    start_worker(short_visibility)
    summary = finish(run_id)
    assert summary["status"] == "succeeded"
    assert ledger.view.results(run_id) == [fib(25)]
    seen = fib_requests(vendor)
    assert sorted(seen) == list(range(1, 27))
    # Completed iterations were never run again; only the one in flight may repeat.
    assert all(seen[n] == 1 for n in range(1, resumed_at))
    assert sum(seen.values()) <= 26 + 1


def test_max_iterations_fails_the_item_with_a_clear_error(
    vendor: VendorHandle, start_worker: WorkerFactory
) -> None:
    start_worker(LOOP_WORKER_ENV)
    run_id = run_stage("forever", [None], vendor)
    summary = finish(run_id)
    assert summary["status"] == "partial"
    assert summary["stages"]["forever"]["failed"] == 1
    assert summary["stages"]["forever"]["iterations"] == 5
    [failure] = services().ledger.view.failures(run_id).values()
    assert failure["error_type"] == "LoopLimitExceeded"
    assert "max_iterations=5" in failure["message"]
    assert failure["iteration"] == 5


def test_delay_longer_than_visibility_timeout_runs_once(
    vendor: VendorHandle, start_worker: WorkerFactory
) -> None:
    start_worker({**LOOP_WORKER_ENV, "FANOUT_VISIBILITY_TIMEOUT_S": "2"})
    started = time.monotonic()
    run_id = run_stage("wait_then_fetch", [None], vendor, delay_s=5)
    summary = finish(run_id)
    assert time.monotonic() - started >= 5  # the delay was honoured
    assert summary["status"] == "succeeded"
    assert summary["stages"]["wait_then_fetch"]["iterations"] == 2
    assert services().ledger.view.results(run_id) == [1]
    # A 5 s ETA past a 2 s visibility timeout would have been delivered twice.
    assert fib_requests(vendor) == {1: 1}


def test_async_report_polls_until_ready(
    vendor: VendorHandle, start_worker: WorkerFactory, sink_path: Path
) -> None:
    vendor.configure(accounts=2, services=3, report_polls=3)
    start_worker()
    run_id = start_run("demo_report", {"days": 2, "end_day": "2026-01-31",
                                       "vendor_url": vendor.url, "poll_delay_s": 0.2})
    summary = finish(run_id)
    assert summary["status"] == "succeeded"
    report = summary["stages"]["report"]
    assert (report["enqueued"], report["succeeded"]) == (4, 4)
    # create, three polls answered "pending", one "ready": five iterations per report.
    assert report["iterations"] == 4 * 5
    stats = vendor.stats()["by_endpoint"]
    assert (stats["reports_create"], stats["reports_poll"]) == (4, 16)
    rows = sink_rows(sink_path)
    assert len(rows) == summary["rows_written"] == 2 * 2 * 3
    assert {r[0] for r in rows} == {"demo-report"}


def test_fibonacci_example_prints_what_the_seed_prints(redis_url: str) -> None:
    env = {**os.environ, "FANOUT_REDIS_URL": redis_url}
    script = str(ROOT / "examples" / "fibonacci.py")
    one = subprocess.run([sys.executable, script, "100"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip().splitlines()[-1] == "89"
    mapped = subprocess.run([sys.executable, script, "10", "100", "1000", "1500"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert mapped.returncode == 0, mapped.stderr
    assert mapped.stdout.strip().splitlines()[-1] == "[8, 89, 987, 987]"
