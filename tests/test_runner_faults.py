"""Each error in its bucket, on real workers (pipelines in ``fault_pipelines.py``):
- a hook that raises: ``before`` is the item's error; ``after`` and ``on_failure`` are logged
  with their traceback, the other hooks still run (in reverse order) and the item's outcome
  stands; the batch is recorded and its claims released;
- a record the sink refuses fails its own item only, the rest of its batch is written;
- a failed item's traceback is kept: ``fanout failures --json`` and its short form.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import fault_pipelines  # noqa: F401  (registers the pipelines in this process)
import pytest
import redis
from conftest import WorkerFactory, claims_released, rows_at
from fault_pipelines import calls_key

from producers.trigger import start_run
from workers.engine.services import services
from workers.keys import queue_name

WORKER_ENV = {"PYTHONPATH": str(Path(__file__).resolve().parent),
              "FANOUT_PIPELINES": "fault_pipelines"}


def run_roots(pipeline: str, roots: list[int]) -> tuple[str, dict[str, Any]]:
    run_id = start_run(pipeline, {}, roots=roots, root_stage="leaf")
    return run_id, {}


def finished(run_id: str) -> dict[str, Any]:
    ledger = services().ledger
    assert ledger.view.wait(run_id, 60) is not None, "the run did not finish"
    snap = ledger.view.snapshot(run_id, ["leaf"])
    assert snap is not None
    return snap.summary()


def fanout(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "producers.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **WORKER_ENV})


def test_hooks_that_raise_are_isolated_and_the_batch_is_recorded(
    start_worker: WorkerFactory, redis_client: redis.Redis, tmp_path: Path,
) -> None:
    # Queued before the worker starts, so its one thread claims them all in one batch.
    run_id, _ = run_roots("hookfaults", [0, 1, 2, 3])
    start_worker(WORKER_ENV, concurrency=1)
    summary = finished(run_id)

    assert summary["status"] == "partial"
    assert summary["stages"]["leaf"] == {"enqueued": 4, "succeeded": 2, "failed": 2,
                                         "cached": 0, "retried": 0, "throttled": 0,
                                         "skipped": 0}
    calls = redis_client.lrange(calls_key(run_id), 0, -1)
    by_item = {n: [c.split(":")[0] for c in calls if c.endswith(f":{n}")] for n in range(4)}
    assert by_item == {
        0: ["outer.before", "inner.before", "inner.after", "outer.after"],
        # Faulty.before raised: the item failed with it; only the hook entered before it
        # hears of the failure.
        1: ["outer.before", "outer.on_failure final"],
        # Faulty.after raised (between the two): both recorders' after ran, the item succeeded.
        2: ["outer.before", "inner.before", "inner.after", "outer.after"],
        # The stage raised, Faulty.on_failure raised too: both recorders heard of it.
        3: ["outer.before", "inner.before", "inner.on_failure final",
            "outer.on_failure final"],
    }
    failures = {f["item"]: f for f in services().ledger.view.failures(run_id).values()}
    assert sorted(failures) == [1, 3]
    assert (failures[1]["error_type"], failures[1]["message"]) == \
        ("RuntimeError", "before broke on 1")
    assert (failures[3]["error_type"], failures[3]["message"]) == ("ValueError", "leaf 3 broke")
    assert services().ledger.view.results(run_id) == [0, None, 20, None]
    claims_released(redis_client, queue_name("hookfaults", "leaf"))

    log = (tmp_path / "worker0.log").read_text()
    for method, item in (("after", 2), ("on_failure", 3)):
        line = f"hook Faulty.{method}() raised (the item's outcome stands)"
        assert log.count(line) == 1, log
        assert f"RuntimeError: {method} broke on {item}" in log.split(line, 1)[1]
    assert log.count("failed after 1 attempts") == 2  # items 1 and 3, with their tracebacks


def test_a_failed_items_traceback_is_kept_and_shown(
    start_worker: WorkerFactory, tmp_path: Path,
) -> None:
    run_id, _ = run_roots("hookfaults", [3])
    start_worker(WORKER_ENV, concurrency=1)
    assert finished(run_id)["status"] == "partial"

    result = fanout("failures", run_id, "--json")
    assert result.returncode == 0, result.stderr
    (failure,) = json.loads(result.stdout).values()
    trace = failure["traceback"]
    assert trace.startswith("Traceback (most recent call last):\n")
    assert 'fault_pipelines.py", line' in trace and "in hook_leaf" in trace
    assert 'raise ValueError(f"leaf {n} broke")' in trace
    assert trace.endswith("ValueError: leaf 3 broke\n")

    short = fanout("failures", run_id)
    assert short.returncode == 0, short.stderr
    lines = short.stdout.splitlines()
    assert lines[0].startswith("leaf ") and "ValueError: leaf 3 broke" in lines[0]
    assert lines[1].startswith("  raised at ") and lines[1].endswith("in hook_leaf")
    assert "fault_pipelines.py:" in lines[1]
    # The worker logged the final failure with its traceback.
    log = (tmp_path / "worker0.log").read_text()
    assert "hookfaults.leaf" in log and "failed after 1 attempts: leaf 3 broke" in log
    assert 'raise ValueError(f"leaf {n} broke")' in log


@pytest.mark.parametrize("sink", ["sqlite", "postgres"])
def test_a_record_the_sink_refuses_fails_its_item_and_the_batch_is_written(
    sink: str, start_worker: WorkerFactory, request: pytest.FixtureRequest, tmp_path: Path,
) -> None:
    url = os.environ["FANOUT_SINK_URL"] if sink == "sqlite" else \
        request.getfixturevalue("postgres_url")
    run_id, _ = run_roots("sinkfaults", list(range(6)))
    start_worker({**WORKER_ENV, "FANOUT_SINK_URL": url}, concurrency=1)
    summary = finished(run_id)

    assert summary["status"] == "partial"
    assert summary["stages"]["leaf"]["succeeded"] == 5
    assert summary["stages"]["leaf"]["failed"] == 1
    assert summary["rows_written"] == 5
    assert [row[:6] for row in rows_at(url)] == [
        ("sinkfaults", "acct", f"svc-{n}", "m", "2026-01-01", float(n)) for n in (0, 1, 2, 4, 5)
    ]
    (failure,) = services().ledger.view.failures(run_id).values()
    assert failure["item"] == 3
    assert failure["error_type"] == "SinkDataError"
    assert "null" in failure["message"].lower()
    assert "SinkDataError" in failure["traceback"]
    log = (tmp_path / "worker0.log").read_text()
    assert "sink unreachable" not in log
    assert log.count("the sink refused its 1 records") == 1


def test_the_task_events_of_a_batch_carry_each_failed_items_traceback(
    start_worker: WorkerFactory,
) -> None:
    """What Flower is given: a task-failed event per failed item of a claimed batch, with
    its error and its traceback."""
    from workers.celery import app

    failed: dict[str, dict[str, Any]] = {}
    ended = threading.Event()
    ready = threading.Event()

    def on_failed(event: dict[str, Any]) -> None:
        failed[event["args"]] = event

    def on_any(event: dict[str, Any]) -> None:
        if len(failed) == 2:
            ended.set()

    def listen() -> None:
        with app.connection_for_read() as conn:
            receiver = app.events.Receiver(conn, handlers={"task-failed": on_failed,
                                                           "*": on_any})
            ready.set()
            for _ in receiver.itercapture(limit=None, timeout=60, wakeup=False):
                if ended.is_set():
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert ready.wait(30)
    # One batch: 0 is the task's own message (the only one prefetched), 1-3 the items it
    # claimed. (The task's own item is told by Celery's own events.)
    run_id, _ = run_roots("hookfaults", [0, 1, 2, 3])
    start_worker({**WORKER_ENV, "FANOUT_PREFETCH_MULTIPLIER": "1"}, concurrency=1)
    assert finished(run_id)["status"] == "partial"
    assert ended.wait(30), failed
    by_item = {ast.literal_eval(args)[-1]: event for args, event in failed.items()}
    assert sorted(by_item) == [1, 3]
    assert by_item[3]["exception"] == "ValueError: leaf 3 broke"
    assert by_item[3]["traceback"].startswith("Traceback (most recent call last):")
    assert by_item[3]["traceback"].endswith("ValueError: leaf 3 broke\n")
    assert by_item[1]["traceback"].endswith("RuntimeError: before broke on 1\n")


def test_the_tasks_own_item_is_failure_or_retry_in_its_celery_events(
    start_worker: WorkerFactory,
) -> None:
    """What Flower is told of a task's own message: Celery's own task-failed, with the
    item's error and the traceback of the stage, for an item that failed for good, and
    task-retried, then task-succeeded, for one that failed once and was retried (on 0bb300f
    both ended task-succeeded with the result 'failed' or 'retrying')."""
    from workers.celery import app

    events: dict[str, list[dict[str, Any]]] = {}
    ready, ended = threading.Event(), threading.Event()

    def on_event(event: dict[str, Any]) -> None:
        if event.get("uuid"):
            events.setdefault(event["uuid"], []).append(event)
            last = [kinds[-1]["type"] for kinds in events.values()]
            if len(last) == 3 and set(last) <= {"task-failed", "task-succeeded"}:
                ended.set()

    def listen() -> None:
        with app.connection_for_read() as conn:
            receiver = app.events.Receiver(conn, handlers={"*": on_event})
            ready.set()
            for _ in receiver.itercapture(limit=None, timeout=60, wakeup=False):
                if ended.is_set():
                    return

    threading.Thread(target=listen, daemon=True).start()
    assert ready.wait(30)
    run_id = start_run("flaky", {}, roots=["fail", "retry", "ok"], root_stage="leaf")
    start_worker({**WORKER_ENV, "FANOUT_PREFETCH_MULTIPLIER": "1"}, concurrency=1)
    summary = finished(run_id)
    assert summary["status"] == "partial"
    assert summary["stages"]["leaf"] == {"enqueued": 3, "succeeded": 2, "failed": 1,
                                         "cached": 0, "retried": 2, "throttled": 0,
                                         "skipped": 0}
    assert ended.wait(30), events
    by_item = {ast.literal_eval(evs[0]["args"])[-1]: evs for evs in events.values()}
    kinds = {item: [e["type"] for e in evs] for item, evs in by_item.items()}
    # "fail" is retried once, then fails for good; "retry" is retried once, then succeeds.
    assert kinds["fail"] == ["task-received", "task-started", "task-retried",
                             "task-received", "task-started", "task-failed"]
    assert kinds["retry"] == ["task-received", "task-started", "task-retried",
                              "task-received", "task-started", "task-succeeded"]
    assert kinds["ok"] == ["task-received", "task-started", "task-succeeded"]
    failed = by_item["fail"][-1]
    assert failed["exception"] == "ValueError('fail on attempt 2')"
    assert failed["traceback"].startswith("Traceback (most recent call last):")
    assert 'in flaky_leaf\n    raise ValueError(f"{item} on attempt {ctx.attempt}")' \
        in failed["traceback"]
    assert failed["traceback"].endswith("ValueError: fail on attempt 2\n")
    retried = by_item["retry"][2]
    # Celery's own form for a retry: Retry(Retry(...), ValueError('retry on attempt 1'), None)
    assert "ValueError('retry on attempt 1')" in retried["exception"]
    assert "in flaky_leaf" in retried["traceback"]
    assert "ValueError: retry on attempt 1" in retried["traceback"]
