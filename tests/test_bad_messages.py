"""Messages that are not fanout deliveries, pushed into a live run's queues: none may kill a
worker, stall the run or vanish. Each becomes a dead letter with its reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import redis
from conftest import VendorHandle, WorkerFactory, claims_released, sink_rows, wait_for
from queue_payloads import malformed
from test_harvest import expected_rows, finish, run_demo

from workers.engine.services import services
from workers.keys import queue_name
from workers.message import Delivery, encode_redis

LEAF = queue_name("demo", "metric_day")
SERVICES = queue_name("demo", "services")
ACCOUNTS = queue_name("demo", "accounts")
UNACKED = "unacked"  # kombu's Redis hash of delivered, unacknowledged messages


def envelope(queue: str, **changes: Any) -> str:
    """A well-formed message for ``queue`` of a run that does not exist, ``changes`` applied."""
    stage = queue.rsplit(".", 1)[1]
    delivery = Delivery(f"demo.{stage}", "no-run", f"{stage}:x", {})
    message = json.loads(encode_redis(delivery))
    for path, value in changes.items():
        target = message
        *parents, last = path.split("__")
        for key in parents:
            target = target[key]
        target[last] = value
    return json.dumps(message)


def bad_messages(queue: str) -> dict[str, tuple[str, str]]:
    """Each kind of bad message for ``queue``: (raw message, what its reason must say)."""
    return {
        "plain text": ("this is not json", "not JSON"),
        "a JSON list": (json.dumps([1, 2, 3]), "the envelope is a JSON list, not an object"),
        "an object of another shape": (json.dumps({"hello": "world"}),
                                       "the envelope has no properties object"),
        "an unknown task": (envelope(queue, headers__task="demo.nosuch"),
                            "unknown task 'demo.nosuch'"),
        "a pickle content type": (
            envelope(queue, **{"content-type": "application/x-python-serialize"}),
            "content type 'application/x-python-serialize' is not"),
        "args of another shape": (envelope(queue, body="[[1, 2], {}, {}]"),
                                  "args are not [run_id, item_id, item]"),
    }


KINDS = len(bad_messages(LEAF))


def _said_ready(log: Path) -> str:
    """The worker's log once it says it is ready, else ""."""
    text = log.read_text()
    return text if " ready." in text else ""


def test_bad_messages_are_dead_lettered_and_the_run_ends_exactly(
    vendor: VendorHandle, start_worker: WorkerFactory, redis_client: redis.Redis,
    sink_path: Path,
) -> None:
    vendor.configure(accounts=2, services=3, latency_ms=5)
    # Fan out first, so the leaves wait on their queue with the bad messages among them.
    fan_out = start_worker(queues=[queue_name("demo", "accounts"), SERVICES])
    run_id = run_demo(vendor, days=4)
    wait_for(lambda: redis_client.llen(LEAF) == 24, what="24 leaf messages queued")
    # At both ends of the leaf queue (taken first by a consumer, and inside claimed batches),
    # and on a fan-out stage's queue.
    leaf_raws = [raw for raw, _ in bad_messages(LEAF).values()]
    redis_client.rpush(LEAF, *leaf_raws)
    redis_client.lpush(LEAF, *leaf_raws)
    redis_client.rpush(SERVICES, *[raw for raw, _ in bad_messages(SERVICES).values()])

    leaf_workers = [start_worker(queues=[LEAF], concurrency=2) for _ in range(2)]
    summary = finish(run_id)

    assert summary["status"] == "succeeded"
    assert summary["stages"]["metric_day"]["succeeded"] == 24
    assert summary["rows_written"] == 24
    assert [r[:6] for r in sink_rows(sink_path)] == expected_rows(2, 3, 4)
    wait_for(lambda: redis_client.llen(LEAF) + redis_client.llen(SERVICES) == 0,
             what="every bad message taken off its queue")

    letters = services().dead_letters.list()
    assert len(letters) == 3 * KINDS
    for queue, copies in ((LEAF, 2), (SERVICES, 1)):
        for raw, reason in bad_messages(queue).values():
            kept = [x for x in letters if x.queue == queue and reason in x.reason
                    and (x.raw == raw or queue_json_holds(x.raw, raw))]
            assert len(kept) == copies, (queue, reason, [(x.queue, x.reason) for x in letters])
    claims_released(redis_client, LEAF)

    # No worker died or restarted: each is running and became ready exactly once.
    for worker in (fan_out, *leaf_workers):
        assert worker.poll() is None
    logs = sorted(Path(os.environ["FANOUT_HOME"]).parent.glob("worker*.log"))
    assert len(logs) == 3
    for log in logs:
        # A worker started last may still be starting when the others have ended the run.
        text = wait_for(partial(_said_ready, log), what=f"{log.name} ready")
        assert text.count(" ready.") == 1, text[-2000:]
        assert "Unrecoverable error" not in text

    listed = subprocess.run(
        [sys.executable, "-m", "producers.cli", "dead-letters", "--json"],
        capture_output=True, text=True, timeout=60, env=os.environ.copy(),
    )
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 3 * KINDS


def queue_json_holds(kept: str, raw: str) -> bool:
    """A message Celery had already parsed is kept as {content_type, headers, body}, and one
    whose task call did not fit as {task, args, kwargs}: the original must be in it."""
    try:
        original, letter = json.loads(raw), json.loads(kept)
        if letter.get("body") == original.get("body"):
            return True
        return bool(letter.get("args") == json.loads(original["body"])[0])
    except (ValueError, AttributeError, KeyError, TypeError):
        return False


def test_hundreds_of_malformed_messages_on_every_queue_kill_no_worker(
    vendor: VendorHandle, start_worker: WorkerFactory, redis_client: redis.Redis,
    sink_path: Path,
) -> None:
    """A broken producer LPUSHes generated malformed messages (base64 bodies of ``[]`` and
    ``{"a": 1}``, bodies that are not base64, and every other kind in queue_payloads) onto
    every stage queue of a live run served by 2 worker processes."""
    vendor.configure(accounts=3, services=4, latency_ms=5)
    workers = [start_worker(concurrency=2, ready=True) for _ in range(2)]
    run_id = run_demo(vendor, days=5)
    injected = {
        queue: malformed(f"demo.{queue.rsplit('.', 1)[1]}", 200, seed=n)
        for n, queue in enumerate((ACCOUNTS, SERVICES, LEAF))
    }
    for queue, raws in injected.items():
        for start in range(0, len(raws), 50):  # in bursts, as the run goes on
            redis_client.lpush(queue, *raws[start:start + 50])
    summary = finish(run_id)

    assert summary["status"] == "succeeded"
    assert summary["stages"]["metric_day"]["succeeded"] == 60
    assert sum(s["failed"] for s in summary["stages"].values()) == 0
    assert [r[:6] for r in sink_rows(sink_path)] == expected_rows(3, 4, 5)
    letters = wait_for(partial(_all_dead_letters, 600), what="600 dead letters")
    for queue in injected:
        assert len([x for x in letters if x.queue == queue]) == 200, queue
    assert all(x.reason and x.raw for x in letters)
    # Each was refused by a check that names its fault, not by the consumer's last resort.
    assert [x.reason for x in letters if "Celery could not take it" in x.reason] == []
    # None lost: nothing left on a queue, delivered-but-unacked, or claimed.
    for queue in injected:
        assert redis_client.llen(queue) == 0
        claims_released(redis_client, queue)
    wait_for(lambda: redis_client.hlen(UNACKED) == 0, what="no unacked message")

    for worker in workers:
        assert worker.poll() is None
    logs = sorted(Path(os.environ["FANOUT_HOME"]).parent.glob("worker*.log"))
    assert len(logs) == 2
    for log in logs:
        text = log.read_text()
        assert text.count(" ready.") == 1, text[-2000:]
        assert "Unrecoverable error" not in text
        assert "Traceback" not in text, text[-4000:]


def _all_dead_letters(count: int) -> list[Any]:
    letters = services().dead_letters.list()
    assert len(letters) <= count, [x.reason for x in letters[count:]]
    return letters if len(letters) == count else []
