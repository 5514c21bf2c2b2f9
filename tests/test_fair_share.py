"""Fair share between runs on one stage queue (``transport.py``, ``lua/publish.lua``,
``lua/claim.lua``, ``broker.py``): each run waiting on a queue has a lane of its own, kombu's
priority steps of the queue; claims take from every lane, weighted by the runs' priorities,
and Celery's consumer pops the lanes in a random order. Real Redis, real worker processes.

The issue's figure (a 500-leaf run beside a 60,000-leaf backfill on 2 workers) is the
``fairshare`` benchmark; here the backfill is scaled down 15x and the small run 5x (4,000 +
100 leaves, 2 worker processes of 4 threads, a 10 ms sleep leaf, so no machine runs the
backfill before the small run starts), with counts asserted, not times: the small run ends
while the backfill still has at least half its leaves to run. On main's FIFO queues the
same test saw the small run end after the backfill's last leaf (4,000 of 4,000).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import fair_pipelines  # noqa: F401  (registers fairtest here, for start_run)
import pytest
import redis
from conftest import WorkerFactory, claims_released, sink_rows, wait_for

from producers.trigger import start_run
from workers import keys
from workers.app import transport_options
from workers.engine.services import services
from workers.message import Delivery, decode_redis
from workers.transport import RedisTransport

QUEUE = keys.queue_name("fairtest", "leaf")
ENV = {"PYTHONPATH": str(Path(__file__).resolve().parent), "FANOUT_PIPELINES": "fair_pipelines"}


def deliveries(run_id: str, count: int, start: int = 0) -> list[Delivery]:
    return [Delivery("fairtest.leaf", run_id, f"leaf:{run_id}-{i}", i)
            for i in range(start, start + count)]


def runs_of(raws: list[str]) -> Counter[str]:
    return Counter(decode_redis(raw).run_id for raw in raws)


def lane_lengths(client: redis.Redis) -> list[int]:
    return [int(client.llen(lane)) for lane in keys.queue_lanes(QUEUE)]


@pytest.fixture
def transport(redis_client: redis.Redis) -> RedisTransport:
    return RedisTransport(redis_client, 600, owner=lambda: "test:1:claimer")


# -- lanes: where a run's messages wait ---------------------------------------------------


def test_one_run_alone_queues_on_kombus_own_list(
    transport: RedisTransport, redis_client: redis.Redis
) -> None:
    transport.publish(deliveries("a", 2500))  # three chunks of at most 1,000
    assert lane_lengths(redis_client) == [2500] + [0] * 9
    assert transport.queue_depth(QUEUE) == 2500


def test_each_run_waiting_gets_a_lane_of_its_own_and_keeps_it(
    transport: RedisTransport, redis_client: redis.Redis
) -> None:
    transport.publish(deliveries("a", 100))
    transport.publish(deliveries("b", 10))
    transport.publish([*deliveries("c", 5), *deliveries("a", 7, start=100)])  # one publish
    assert lane_lengths(redis_client) == [107, 10, 5] + [0] * 7
    assert transport.queue_depth(QUEUE) == 122
    assert runs_of(transport.claim(QUEUE, 21, 1)) == {"a": 8, "b": 8, "c": 5}
    assert runs_of(transport.claim(QUEUE, 6, 1)) == {"a": 4, "b": 2}
    # b's and c's lanes are empty now: the next runs waiting take them.
    transport.publish(deliveries("d", 3))
    transport.publish(deliveries("e", 4))
    assert lane_lengths(redis_client) == [95, 3, 4] + [0] * 7


def test_with_every_lane_busy_a_run_shares_the_shortest(
    transport: RedisTransport, redis_client: redis.Redis
) -> None:
    for n in range(keys.LANES):
        transport.publish(deliveries(f"r{n}", 20 - n))
    transport.publish(deliveries("late", 4))
    assert lane_lengths(redis_client) == [20 - n for n in range(keys.LANES - 1)] + [11 + 4]
    assert transport.queue_depth(QUEUE) == sum(20 - n for n in range(keys.LANES)) + 4


# -- claims: every waiting run in turn, weighted by priority ------------------------------


def test_a_claim_takes_every_waiting_run_alike(
    transport: RedisTransport, redis_client: redis.Redis
) -> None:
    transport.publish(deliveries("backfill", 1000))
    transport.publish(deliveries("daily", 30))
    assert runs_of(transport.claim(QUEUE, 20, 1)) == {"backfill": 10, "daily": 10}
    # A run with fewer left than its share gives the rest to the others.
    assert runs_of(transport.claim(QUEUE, 40, 1)) == {"backfill": 20, "daily": 20}
    assert runs_of(transport.claim(QUEUE, 40, 1)) == {"backfill": 40}
    assert transport.queue_depth(QUEUE) == 1030  # claimed ones included
    assert redis_client.zcard(keys.claimed(QUEUE)) == 100


def test_small_claims_take_the_runs_in_turn(
    transport: RedisTransport, redis_client: redis.Redis
) -> None:
    transport.publish(deliveries("a", 50))
    transport.publish(deliveries("b", 50))
    transport.publish(deliveries("c", 50))
    order = [decode_redis(transport.claim(QUEUE, 1, 1)[0]).run_id for _ in range(9)]
    assert Counter(order[:3]) == Counter(order[3:6]) == Counter(order[6:]) \
        == {"a": 1, "b": 1, "c": 1}


def test_priority_weights_the_claims(
    transport: RedisTransport, redis_client: redis.Redis
) -> None:
    transport.set_priority("urgent", 3)
    transport.publish(deliveries("backfill", 1000))
    transport.publish(deliveries("urgent", 1000))
    assert runs_of(transport.claim(QUEUE, 40, 1)) == {"backfill": 10, "urgent": 30}
    taken = Counter[str]()
    for _ in range(20):  # small claims too, by the weighted round-robin's credits
        taken += runs_of(transport.claim(QUEUE, 2, 1))
    assert taken == {"backfill": 10, "urgent": 30}


def test_a_claim_takes_no_more_than_its_share_of_every_lane(
    transport: RedisTransport, redis_client: redis.Redis
) -> None:
    transport.publish(deliveries("a", 40))
    transport.publish(deliveries("b", 24))
    assert len(transport.claim(QUEUE, 63, 32)) == 2  # 64 waiting / 32 threads


def test_claims_from_lanes_go_back_when_their_worker_dies(
    transport: RedisTransport, redis_client: redis.Redis
) -> None:
    transport.publish(deliveries("a", 10))
    transport.publish(deliveries("b", 10))
    taken = transport.claim(QUEUE, 8, 1)
    assert transport.queue_depth(QUEUE) == 20
    assert transport.restore_claims([QUEUE], dead=["test:1:claimer"]) == 8
    assert redis_client.zcard(keys.claimed(QUEUE)) == 0
    # Back at the consuming end of lane 0, the first claimed first in line.
    assert lane_lengths(redis_client)[:2] == [14, 6]
    assert redis_client.lrange(QUEUE, -8, -1)[::-1] == taken
    given = transport.claim(QUEUE, 4, 1)
    assert transport.give_back(QUEUE, given) == 4
    assert transport.queue_depth(QUEUE) == 20


def test_flower_counts_every_lane_of_a_queue(
    transport: RedisTransport, redis_url: str
) -> None:
    """Flower's queue view reads the app's transport options: it sums every lane."""
    from flower.utils.broker import Broker

    transport.publish(deliveries("a", 30))
    transport.publish(deliveries("b", 12))
    broker = Broker(redis_url, broker_options=transport_options(300))
    [stats] = asyncio.run(broker.queues([QUEUE]))
    assert stats == {"name": QUEUE, "messages": 42}


# -- priority from the command line and the config file -----------------------------------


def test_a_runs_priority_is_written_before_its_items_are_published(
    redis_client: redis.Redis,
) -> None:
    run_id = start_run("fairtest", {"leaf_s": 0, "label": "p"}, roots=[3], priority=7)
    assert redis_client.get(keys.run_priority(run_id)) == "7"
    assert 0 < redis_client.ttl(keys.run_priority(run_id)) <= services().settings.ledger_ttl_s
    lanes = keys.lane_map(keys.queue_name("fairtest", "spread"))
    assert redis_client.hget(lanes, "weight:0") == "7"
    plain = start_run("fairtest", {"leaf_s": 0, "label": "q"}, roots=[3])
    assert redis_client.get(keys.run_priority(plain)) is None
    # What a worker's gate weighs each run's items by, read back where it was written.
    assert (services().transport.priority(run_id), services().transport.priority(plain)) == (7, 1)


@pytest.mark.parametrize("value", ["0", "101", "high"])
def test_fanout_run_refuses_a_priority_out_of_range_in_one_line(value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "producers.cli", "run", "demo", "--priority", value],
        capture_output=True, text=True, timeout=60, env={**os.environ},
    )
    assert done.returncode == 2
    assert "--priority" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3  # argparse's usage and its one line


def test_a_schedule_with_a_bad_priority_is_one_line(tmp_path: Path) -> None:
    from producers.scheduling import parse_schedule
    from workers.settings import ConfigError

    with pytest.raises(ConfigError, match="priority must be a whole number from 1 to 100"):
        parse_schedule("daily", {"every_s": 2, "pipeline": "demo", "priority": 0})
    schedule = parse_schedule("daily", {"every_s": 2, "pipeline": "demo", "priority": 5})
    assert schedule.run_options()["priority"] == 5


# -- end to end: real workers -------------------------------------------------------------


def leaves_succeeded(run_id: str) -> int:
    snap = services().ledger.view.snapshot(run_id)
    return snap.stages.get("leaf", {}).get("succeeded", 0) if snap else 0


def finished_exact(run_id: str, leaves: int, timeout_s: float = 120) -> dict[str, Any]:
    assert services().ledger.view.wait(run_id, timeout_s) is not None, f"{run_id} unfinished"
    snap = services().ledger.view.snapshot(run_id, ["spread", "leaf"])
    assert snap is not None
    summary = snap.summary()
    assert summary["status"] == "succeeded"
    counts = summary["stages"]["leaf"]
    assert (counts["enqueued"], counts["succeeded"], counts["failed"]) == (leaves, leaves, 0)
    assert summary["rows_written"] == leaves
    return summary


def rows_of(sink_path: Path, label: str) -> list[str]:
    return sorted(r[4] for r in sink_rows(sink_path) if r[0] == "fairtest" and r[1] == label)


BACKFILL, DAILY = 4000, 100


def test_a_small_run_started_behind_a_backfill_finishes_beside_it(
    start_worker: WorkerFactory, sink_path: Path, redis_client: redis.Redis
) -> None:
    for _ in range(2):
        start_worker(ENV, ready=True)
    params = {"leaf_s": 0.01}
    backfill = start_run("fairtest", {**params, "label": "backfill"}, roots=[BACKFILL])
    wait_for(lambda: leaves_succeeded(backfill) >= 100, what="the backfill under way")
    daily = start_run("fairtest", {**params, "label": "daily"}, roots=[DAILY])

    finished_exact(daily, DAILY)
    backfill_done = leaves_succeeded(backfill)
    assert backfill_done < BACKFILL // 2, (
        f"the small run ended after {backfill_done} of the backfill's {BACKFILL} leaves")

    finished_exact(backfill, BACKFILL, timeout_s=300)
    assert rows_of(sink_path, "daily") == [f"{n:06d}" for n in range(DAILY)]
    assert rows_of(sink_path, "backfill") == [f"{n:06d}" for n in range(BACKFILL)]
    claims_released(redis_client, QUEUE)
    assert lane_lengths(redis_client) == [0] * keys.LANES


def test_a_worker_sigkilled_while_two_runs_share_a_queue_loses_nothing(
    start_worker: WorkerFactory, sink_path: Path, redis_client: redis.Redis
) -> None:
    victim = start_worker(ENV, ready=True)
    start_worker(ENV, ready=True)
    params = {"leaf_s": 0.01}
    first = start_run("fairtest", {**params, "label": "first"}, roots=[1500])
    wait_for(lambda: leaves_succeeded(first) >= 50, what="the first run under way")
    second = start_run("fairtest", {**params, "label": "second"}, roots=[600])
    wait_for(lambda: leaves_succeeded(second) >= 50, what="the second run under way")
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert leaves_succeeded(first) < 1500 and leaves_succeeded(second) < 600

    finished_exact(first, 1500, timeout_s=300)
    finished_exact(second, 600, timeout_s=300)
    assert rows_of(sink_path, "first") == [f"{n:06d}" for n in range(1500)]
    assert rows_of(sink_path, "second") == [f"{n:06d}" for n in range(600)]
    claims_released(redis_client, QUEUE)
    assert lane_lengths(redis_client) == [0] * keys.LANES


# -- runs sharing one claimed batch of an async stage --------------------------------------


def test_runs_sharing_an_async_batch_are_each_recorded_when_their_own_items_end(
    transport: RedisTransport, sink_path: Path
) -> None:
    """A worker's claimed batch holds a backfill's items and a small run's: the small run's
    are recorded as soon as they have ended, not when the backfill's beside them end (the
    runner, in this process, on a batch claimed as a worker's thread claims it)."""
    import threading

    from workers.api import find_stage
    from workers.engine.runner import StageRunner
    from workers.outcome import Outcome

    view = services().ledger.view
    slow = start_run("fairtest_async", {"leaf_s": 3, "label": "slow"}, roots=list(range(20)))
    fast = start_run("fairtest_async", {"leaf_s": 0, "label": "fast"}, roots=list(range(10)))
    queue = keys.queue_name("fairtest_async", "wait")
    claimed = transport.claim(queue, 30, 1)
    assert runs_of(claimed) == {slow: 20, fast: 10}  # one batch: both runs' items in it
    work = []
    for raw in claimed:
        delivery = decode_redis(raw)
        stage = find_stage(delivery.task)
        assert stage is not None
        work.append((delivery, stage))
    ended: dict[str, Any] = {}
    batch = threading.Thread(target=lambda: ended.update(reports=StageRunner(services()).run(work)))
    batch.start()
    try:
        assert view.wait(fast, 30) == "succeeded"
        slow_then = view.snapshot(slow)
        assert batch.is_alive(), "the batch ended as the small run did"
        assert slow_then is not None and slow_then.status == "running"
        assert slow_then.stages["wait"]["succeeded"] == 0  # its 3 s items still sleep
    finally:
        batch.join(60)
    assert [r.outcome for r in ended["reports"]] == [Outcome.SUCCEEDED] * 30
    assert view.wait(slow, 10) == "succeeded"
    assert rows_of(sink_path, "fast") == [f"{n:06d}" for n in range(10)]
    assert rows_of(sink_path, "slow") == [f"{n:06d}" for n in range(20)]
    transport.release(queue, claimed)
