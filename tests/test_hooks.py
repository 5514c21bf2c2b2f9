"""Hook points around the stage call, end to end: a skipped, a deferred and a served item on
real workers, a served (cached) mapped stage that still fans out its children, and a user
hook's retry decision (driven by a stage option it declares) applied by the runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hook_pipelines  # noqa: F401  (registers the hooktest pipeline in this process)
from conftest import VendorHandle, WorkerFactory

from producers.trigger import start_run
from workers.engine.services import services

WORKER_ENV = {"PYTHONPATH": str(Path(__file__).resolve().parent),
              "FANOUT_PIPELINES": "hook_pipelines"}
ZERO = {"enqueued": 0, "succeeded": 0, "failed": 0, "cached": 0, "retried": 0,
        "throttled": 0, "skipped": 0}


def run_once(vendor: VendorHandle) -> dict[str, Any]:
    run_id = start_run("hooktest", {"vendor_url": vendor.url}, roots=[5], root_stage="numbers")
    ledger = services().ledger
    assert ledger.view.wait(run_id, 60) is not None, "the run did not finish"
    snap = ledger.view.snapshot(run_id, ["numbers", "fetch"])
    assert snap is not None
    return snap.summary()


def test_hooks_skip_defer_and_serve_and_a_served_stage_still_fans_out(
    vendor: VendorHandle, start_worker: WorkerFactory
) -> None:
    start_worker(WORKER_ENV)

    first = run_once(vendor)
    assert first["status"] == "succeeded"
    assert first["stages"]["numbers"] == {**ZERO, "enqueued": 1, "succeeded": 1}
    # 0, 1, 2 and (after one deferral) 4 ran; 3 was skipped by a hook.
    assert first["stages"]["fetch"] == {**ZERO, "enqueued": 5, "succeeded": 4, "skipped": 1,
                                        "throttled": 1}
    fib_calls = {p: n for p, n in vendor.stats()["by_path"].items() if p.startswith("/fib/")}
    assert fib_calls == {"/fib/1": 1, "/fib/2": 1, "/fib/3": 1, "/fib/5": 1}

    second = run_once(vendor)
    assert second["status"] == "succeeded"
    # The served root still fanned out its five children, which were served in turn.
    assert second["stages"]["numbers"] == {**ZERO, "enqueued": 1, "cached": 1}
    assert second["stages"]["fetch"] == {**ZERO, "enqueued": 5, "cached": 4, "skipped": 1,
                                         "throttled": 1}
    after = {p: n for p, n in vendor.stats()["by_path"].items() if p.startswith("/fib/")}
    assert after == fib_calls  # no vendor call in the second run


def test_a_user_hook_s_retry_decision_is_applied_with_the_stage_option_it_declares(
    start_worker: WorkerFactory,
) -> None:
    start_worker(WORKER_ENV)
    run_id = start_run("hookretry", {}, roots=[1, 2, 3, 4], root_stage="flaky")
    ledger = services().ledger
    assert ledger.view.wait(run_id, 60) is not None, "the run did not finish"
    snap = ledger.view.snapshot(run_id, ["flaky"])
    assert snap is not None
    summary = snap.summary()
    assert summary["status"] == "partial"
    # 1 ran once; 2 and 3 after 1 and 2 retries; 4 failed after its 2 retries (3 tries).
    assert summary["stages"]["flaky"] == {**ZERO, "enqueued": 4, "succeeded": 3, "failed": 1,
                                          "retried": 5}
    assert ledger.view.results(run_id) == [1, 2, 3, None]
    [failure] = ledger.view.failures(run_id).values()
    assert (failure["item"], failure["error_type"], failure["attempts"]) == (4, "Busy", 3)
