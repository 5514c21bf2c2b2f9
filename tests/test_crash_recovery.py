"""Worker liveness end to end (``workers/liveness.py``, the reaper): a SIGKILLed worker's
messages come back in seconds at the default visibility timeout, and a live worker's task
that runs longer than the visibility timeout runs exactly once. Real Redis, real worker
processes, the demo vendor as a real HTTP server."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import slow_pipelines
from conftest import VendorHandle, WorkerFactory, claims_released, sink_rows, wait_for
from test_harvest import expected_rows, finish, leaves_done, run_demo

from producers.trigger import start_run
from workers import keys
from workers.engine.services import services

#: From the kill to the run's end, at the default visibility timeout (300 s): the heartbeat
#: TTL (10 s), a probe (1 s), the watch's grace for a message lost in the kill (5 s), the work.
RECOVERY_BUDGET_S = 30.0


def test_a_sigkilled_workers_messages_come_back_in_seconds_at_the_default_timeout(
    vendor: VendorHandle, start_worker: WorkerFactory, sink_path: Path,
    redis_client: redis.Redis,
) -> None:
    vendor.configure(accounts=2, services=10, latency_ms=50)
    assert "FANOUT_VISIBILITY_TIMEOUT_S" not in os.environ  # the default: 300 s
    victim = start_worker(ready=True)
    start_worker(ready=True)
    run_id = run_demo(vendor, days=20)

    wait_for(lambda: leaves_done(run_id) >= 40, what="40 leaves done before the kill")
    os.killpg(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    victim.wait()
    assert leaves_done(run_id) < 400, "the run finished before the worker was killed"

    summary = finish(run_id, timeout_s=RECOVERY_BUDGET_S)
    assert time.monotonic() - killed_at < RECOVERY_BUDGET_S

    assert summary["status"] == "succeeded"
    for stage, n in (("accounts", 2), ("services", 20), ("metric_day", 400)):
        counts = summary["stages"][stage]
        assert (counts["enqueued"], counts["succeeded"], counts["failed"]) == (n, n, 0)
    assert summary["rows_written"] == 400
    assert [r[:6] for r in sink_rows(sink_path)] == expected_rows(2, 10, 20)
    fetched = {p: n for p, n in vendor.stats()["by_path"].items() if "/metrics?" in p}
    assert len(fetched) == 400  # every metric-day; twice only what the dead worker held
    # The dead worker is forgotten; the survivor is the one worker known. Every key of
    # liveness expires.
    [survivor] = redis_client.zrange(keys.WORKERS, 0, -1)
    assert f":{victim.pid}:" not in survivor
    liveness_keys = [keys.WORKERS, *redis_client.keys("fanout:worker:*"),
                     *redis_client.keys("fanout:claimers:*")]
    # -1: a key without a TTL (-2: one that went between KEYS and TTL, as a held set does
    # when its last tag is acked).
    assert {k for k in liveness_keys if redis_client.ttl(k) == -1} == set()


SLOW_ENV = {"PYTHONPATH": str(Path(__file__).resolve().parent),
            "FANOUT_PIPELINES": "slow_pipelines", "FANOUT_VISIBILITY_TIMEOUT_S": "5",
            "FANOUT_PREFETCH_MULTIPLIER": "1"}


def calls(client: redis.Redis, run_id: str) -> dict[str, str]:
    """How many times each item's stage function was called."""
    return dict(client.hgetall(slow_pipelines.calls_key(run_id)))


def finish_slow(run_id: str, timeout_s: float = 90) -> dict[str, Any]:
    assert services().ledger.view.wait(run_id, timeout_s) is not None, "the run did not finish"
    snap = services().ledger.view.snapshot(run_id, ["long", "batched"])
    assert snap is not None
    summary = snap.summary()
    assert summary["status"] == "succeeded"
    return summary


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_live_workers_task_longer_than_the_visibility_timeout_runs_once(
    start_worker: WorkerFactory, redis_client: redis.Redis, pool: str
) -> None:
    """``long`` sleeps 12 s; the visibility timeout is 5 s, the stall sweep's 10 s (5 s, not
    less: a lease renewed every second has 4 s of slack on a loaded machine). Two
    one-thread workers: the one that is idle would run at once any copy handed out."""
    start_worker(SLOW_ENV, concurrency=1, pool=pool, ready=True)
    start_worker(SLOW_ENV, concurrency=1, pool=pool, ready=True)
    run_id = start_run("slowtest", {"sleep_s": 12}, roots=[0], root_stage="long")

    summary = finish_slow(run_id)

    assert summary["stages"]["long"]["succeeded"] == 1
    assert calls(redis_client, run_id) == {"long:0": "1"}


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_live_workers_claimed_batch_longer_than_the_visibility_timeout_runs_once(
    start_worker: WorkerFactory, redis_client: redis.Redis, pool: str
) -> None:
    """One task carries four ``batched`` items (its own and three claimed), 2.5 s each: 10 s,
    with a visibility timeout of 5 s. A second worker, started once the claim is made, is
    idle: it would run at once any copy handed out. With the prefork pool the claim is a
    child process's, which beats under its own id."""
    run_id = start_run("slowtest", {"item_sleep_s": 2.5}, roots=[0, 1, 2, 3],
                       root_stage="batched")
    start_worker(SLOW_ENV, concurrency=1, pool=pool, ready=True)
    batched_queue = keys.queue_name("slowtest", "batched")
    wait_for(lambda: redis_client.hlen(keys.claimers(batched_queue)) == 3,
             what="three batched items claimed by one task")
    start_worker(SLOW_ENV, concurrency=1, pool=pool, ready=True)

    summary = finish_slow(run_id)

    assert summary["stages"]["batched"]["succeeded"] == 4
    assert calls(redis_client, run_id) == {f"batched:{i}": "1" for i in range(4)}


def test_a_killed_prefork_childs_claims_come_back_in_seconds(
    start_worker: WorkerFactory, redis_client: redis.Redis
) -> None:
    """The pool child running a claimed batch is SIGKILLed (an OOM kill, say): Celery gives
    the task's own message back; the three claims are the child's, under its own id, and come
    back once its heartbeat is old, at the default visibility timeout (300 s)."""
    env = {k: v for k, v in SLOW_ENV.items() if k != "FANOUT_VISIBILITY_TIMEOUT_S"}
    run_id = start_run("slowtest", {"item_sleep_s": 2.5}, roots=[0, 1, 2, 3],
                       root_stage="batched")
    start_worker(env, concurrency=1, pool="prefork", ready=True)
    batched_queue = keys.queue_name("slowtest", "batched")
    claimers = wait_for(lambda: redis_client.hgetall(keys.claimers(batched_queue)),
                        what="the batch claimed")
    [child] = set(claimers.values())
    os.kill(int(child.split(":")[1]), signal.SIGKILL)  # the id is host:pid:random
    killed_at = time.monotonic()

    summary = finish_slow(run_id, timeout_s=RECOVERY_BUDGET_S)
    assert time.monotonic() - killed_at < RECOVERY_BUDGET_S

    assert summary["stages"]["batched"]["succeeded"] == 4
    assert summary["stages"]["batched"]["enqueued"] == 4
    claims_released(redis_client, batched_queue)  # released right after the record that ended
    assert redis_client.exists(keys.claimed(batched_queue)) == 0
