"""The reaper (``workers/engine/reaper.py``) on a real Redis, no worker running, with a fake
clock: a run is set up in the ledger with its items registered but never published (their
messages were "lost"), and the clock is moved past the stall time instead of sleeping. A dead
worker is one whose last heartbeat is written in the past, never waited for; its unacked
messages are taken on a real kombu channel of this process."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis
from conftest import FakeClock

from producers.trigger import load_configured_pipelines
from workers import keys
from workers.api import Pipeline, get_pipeline
from workers.app import RedisBrokerHooks, create_app
from workers.engine.reaper import PROBE_GAP_S, Reaper
from workers.engine.scheduler import Scheduler
from workers.engine.services import Services
from workers.ids import item_id
from workers.keys import RunKeys
from workers.ledger import Finish
from workers.liveness import HEARTBEAT_TTL_S, Liveness, worker_id
from workers.message import Delivery, decode_redis
from workers.outcome import Outcome
from workers.transport import RedisTransport

RUN = "run-lost"


@pytest.fixture
def demo(svc: Services) -> Pipeline:
    return get_pipeline("demo")


@pytest.fixture
def client(svc: Services) -> redis.Redis:
    return svc.ledger.redis


def vt(svc: Services) -> float:
    return float(svc.settings.visibility_timeout_s)


class LostRun:
    """A demo run: account a1 finished, account a2 looping at iteration 2, two services and two
    metric days registered; nothing on any queue. Five items are pending and lost."""

    def __init__(self, svc: Services, demo: Pipeline) -> None:
        ledger = svc.ledger
        self.demo = demo
        accounts = [{"account": "a1"}, {"account": "a2"}]
        self.a1, self.a2 = (item_id("accounts", RUN, i, p) for i, p in enumerate(accounts))
        services = [{"account": "a2", "service": f"s{i}", "metric": "cpu"} for i in (1, 2)]
        days = [{**services[0], "day": f"2024-01-0{i}"} for i in (1, 2)]
        self.payloads: dict[str, Any] = {self.a1: accounts[0], self.a2: accounts[1]}
        self.services = [item_id("services", self.a2, i, p) for i, p in enumerate(services)]
        self.days = [item_id("metric_day", self.services[0], i, p) for i, p in enumerate(days)]
        self.payloads |= dict(zip(self.services, services, strict=True))
        self.payloads |= dict(zip(self.days, days, strict=True))

        roots = [(self.a1, accounts[0]), (self.a2, accounts[1])]
        assert ledger.runs.create(RUN, "demo", {"days": 2}, "accounts", roots) is True
        items = ledger.items
        assert items.register(RUN, "services", list(zip(self.services, services, strict=True)))
        assert items.register(RUN, "metric_day", list(zip(self.days, days, strict=True)))
        assert ledger.items.finish(Finish(RUN, "accounts", self.a1, Outcome.SUCCEEDED)) == 1
        assert ledger.loops.advance(RUN, "accounts", self.a2, 1, "cursor-2") is True
        self.progress_at_raw = str(svc.ledger.redis.hget(RunKeys.of(RUN).run, "progress_at"))
        self.progress_at = float(self.progress_at_raw)

    def delivery(self, item: str) -> Delivery:
        stage = self.demo.stages[item.split(":", 1)[0]]
        if item == self.a2:
            return Delivery(stage.task_name, RUN, item, self.payloads[item], 2, "cursor-2")
        return Delivery(stage.task_name, RUN, item, self.payloads[item])

    def queue(self, stage: str) -> str:
        return self.demo.stages[stage].queue


@pytest.fixture
def lost(svc: Services, demo: Pipeline) -> LostRun:
    return LostRun(svc, demo)


def on_queue(client: redis.Redis, queue: str) -> list[Delivery]:
    """The queue's messages, decoded, by item id."""
    return sorted((decode_redis(raw) for raw in client.lrange(queue, 0, -1)),
                  key=lambda d: d.item_id)


def by_item(deliveries: list[Delivery]) -> list[Delivery]:
    return sorted(deliveries, key=lambda d: d.item_id)


def depths(client: redis.Redis, demo: Pipeline) -> dict[str, int]:
    return {name: int(client.llen(stage.queue)) for name, stage in demo.stages.items()}


def test_a_run_with_recent_progress_is_not_touched(
    svc: Services, demo: Pipeline, client: redis.Redis, lost: LostRun
) -> None:
    reaper = Reaper(svc, vt(svc), clock=FakeClock(lost.progress_at + 2 * vt(svc) - 1))

    assert reaper.sweep() == 0

    assert depths(client, demo) == {"accounts": 0, "services": 0, "metric_day": 0}
    assert client.hget(RunKeys.of(RUN).run, "progress_at") == lost.progress_at_raw


def test_a_stalled_run_has_exactly_its_pending_items_published_again(
    svc: Services, demo: Pipeline, client: redis.Redis, lost: LostRun,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An item of a stage the pipeline does not have (any more) is left alone.
    assert svc.ledger.items.register(RUN, "ghost", [("ghost:x", {"x": 1})]) == 1
    progress_at = float(client.hget(RunKeys.of(RUN).run, "progress_at"))
    clock = FakeClock(progress_at + 2 * vt(svc))
    reaper = Reaper(svc, vt(svc), clock=clock)

    with caplog.at_level(logging.WARNING, logger="fanout.reaper"):
        assert reaper.sweep() == 5

    assert depths(client, demo) == {"accounts": 1, "services": 2, "metric_day": 2}
    assert on_queue(client, lost.queue("accounts")) == [lost.delivery(lost.a2)]
    assert on_queue(client, lost.queue("services")) == by_item(
        [lost.delivery(i) for i in lost.services])
    assert on_queue(client, lost.queue("metric_day")) == by_item(
        [lost.delivery(i) for i in lost.days])
    looping = on_queue(client, lost.queue("accounts"))[0]
    assert (looping.iteration, looping.loop_payload, looping.attempt) == (2, "cursor-2", 1)
    assert looping.task_id == f"{RUN}.{lost.a2}.2"
    assert sorted(r.getMessage() for r in caplog.records if r.name == "fanout.reaper") == [
        f"run {RUN}: publishing 1 lost accounts items again",
        f"run {RUN}: publishing 2 lost metric_day items again",
        f"run {RUN}: publishing 2 lost services items again",
    ]
    touched = float(client.hget(RunKeys.of(RUN).run, "progress_at"))
    assert touched > progress_at

    # Right after: the run was touched.
    assert reaper.sweep() == 0
    # Stalled again later: every stage's queue holds its items, nothing is lost.
    clock.now = touched + 2 * vt(svc)
    assert reaper.sweep() == 0
    assert depths(client, demo) == {"accounts": 1, "services": 2, "metric_day": 2}
    # Nothing was counted by the sweeps.
    snap = svc.ledger.view.snapshot(RUN)
    assert snap is not None
    assert snap.pending == 6
    assert snap.stages["accounts"]["enqueued"] == 2
    assert snap.stages["accounts"]["iterations"] == 1


def test_items_of_a_stage_whose_queue_is_not_empty_are_not_republished(
    svc: Services, demo: Pipeline, client: redis.Redis, lost: LostRun
) -> None:
    other = Delivery("demo.services", "another-run", "services:zz", {"service": "zz"})
    svc.transport.publish([other])
    reaper = Reaper(svc, vt(svc), clock=FakeClock(lost.progress_at + 2 * vt(svc)))

    assert reaper.sweep() == 3

    assert on_queue(client, lost.queue("services")) == [other]
    assert on_queue(client, lost.queue("accounts")) == [lost.delivery(lost.a2)]
    assert on_queue(client, lost.queue("metric_day")) == by_item(
        [lost.delivery(i) for i in lost.days])


def test_items_waiting_in_the_delayed_index_are_not_republished(
    svc: Services, demo: Pipeline, client: redis.Redis, lost: LostRun
) -> None:
    clock = FakeClock(lost.progress_at + 2 * vt(svc))
    scheduler = Scheduler(client, svc.transport, svc.settings.ledger_ttl_s, clock=clock)
    waiting, leftover = lost.days
    scheduler.later(lost.delivery(waiting), 30)
    # An index entry older than the stall window is a mover's leftover, not a waiting item.
    client.zadd(RunKeys.of(RUN).delayed, {leftover: clock.now - 2 * vt(svc) - 1})
    reaper = Reaper(svc, vt(svc), clock=clock)

    assert reaper.sweep() == 4

    assert on_queue(client, lost.queue("metric_day")) == [lost.delivery(leftover)]
    assert on_queue(client, lost.queue("accounts")) == [lost.delivery(lost.a2)]
    assert len(on_queue(client, lost.queue("services"))) == 2
    assert client.zrange(keys.DELAYED, 0, -1) == [lost.delivery(waiting).to_json()]


def claimer(svc: Services, worker: str) -> RedisTransport:
    """The transport of worker ``worker`` (its claims are recorded under that id)."""
    return RedisTransport(svc.ledger.redis, svc.settings.ledger_ttl_s, owner=lambda: worker)


def beat(client: redis.Redis, worker: str, at: float | None = None) -> None:
    """``worker``'s last heartbeat: now (alive), or at ``at`` (server epoch seconds)."""
    Liveness(client, 600).beat(worker, [])
    if at is not None:
        client.zadd(keys.WORKERS, {worker: at})


def test_a_live_workers_claims_are_never_put_back_for_their_age(
    svc: Services, demo: Pipeline, client: redis.Redis, lost: LostRun
) -> None:
    queue = lost.queue("metric_day")
    svc.transport.publish([lost.delivery(d) for d in lost.days])
    claimed = claimer(svc, "w-live").claim(queue, 5)
    assert len(claimed) == 2
    client.zadd(keys.claimed(queue), dict.fromkeys(claimed, 1000.0), xx=True)  # long ago
    beat(client, "w-live")
    reaper = Reaper(svc, vt(svc), clock=FakeClock(lost.progress_at + 2 * vt(svc)))

    assert reaper.reap_dead() == 0  # without worker hooks it looks at no one
    assert reaper.sweep() == 3  # a2 and the two services; the claimed days run

    assert client.llen(queue) == 0
    assert sorted(client.zrange(keys.claimed(queue), 0, -1)) == sorted(claimed)
    assert client.hgetall(keys.claimers(queue)) == dict.fromkeys(claimed, "w-live")


class KombuWorkers:
    """The reaper's ``WorkerHooks`` of a real worker (``RedisBrokerHooks``), on a kombu
    channel this test delivers messages on: what it takes is held by this process's id."""

    def __init__(self, client: redis.Redis) -> None:
        self.app = create_app()
        self.hooks = RedisBrokerHooks(self.app, client, Liveness(client, 600))
        self.connection = self.app.connection_for_write()
        self.channel = self.connection.channel()

    def take(self, queue: str) -> Any:
        message = self.channel.basic_get(queue, no_ack=False)
        assert message is not None
        return message

    def close(self) -> None:
        self.connection.release()


@pytest.fixture
def kombu_workers(client: redis.Redis) -> Any:
    workers = KombuWorkers(client)
    yield workers
    workers.close()


def test_a_dead_workers_claims_and_unacked_messages_go_back_and_it_is_forgotten(
    svc: Services, demo: Pipeline, client: redis.Redis, lost: LostRun,
    kombu_workers: KombuWorkers, caplog: pytest.LogCaptureFixture,
) -> None:
    days, accounts = lost.queue("metric_day"), lost.queue("accounts")
    svc.transport.publish([lost.delivery(d) for d in lost.days] + [lost.delivery(lost.a2)])
    [dead_claim] = claimer(svc, "w-dead").claim(days, 1)
    # A claim on a queue of a pipeline this worker does not load comes back too.
    alien = "fanout.notloaded.leaf"
    client.lpush(alien, "alien message")
    assert claimer(svc, "w-dead").claim(alien, 1) == ["alien message"]
    [live_claim] = claimer(svc, "w-live").claim(days, 1)
    unacked = kombu_workers.take(accounts)  # held by this process: it "dies" below
    me = worker_id()
    assert client.smembers(keys.worker_held(me)) == {unacked.delivery_tag}
    long_ago = float(client.time()[0]) - 60
    beat(client, "w-dead", at=long_ago)
    beat(client, me, at=long_ago)
    beat(client, "w-live")
    clock = FakeClock(lost.progress_at + 1)
    reaper = Reaper(svc, vt(svc), clock=clock, workers=kombu_workers.hooks)

    with caplog.at_level(logging.WARNING, logger="fanout.reaper"):
        assert reaper.reap_dead() == 2

    assert client.lrange(days, 0, -1) == [dead_claim]
    assert client.lrange(alien, 0, -1) == ["alien message"]
    assert client.zrange(keys.claimed(days), 0, -1) == [live_claim]
    assert client.hgetall(keys.claimers(days)) == {live_claim: "w-live"}
    assert on_queue(client, accounts) == [lost.delivery(lost.a2)]
    assert kombu_workers.hooks.unacked() == 0
    assert client.zrange(keys.WORKERS, 0, -1) == ["w-live"]
    assert client.exists(keys.worker_held(me), keys.worker_queues("w-dead")) == 0
    assert sorted(r.getMessage() for r in caplog.records if r.name == "fanout.reaper") == [
        f"worker {me} died: put back 0 claimed and 1 unacknowledged messages",
        "worker w-dead died: put back 2 claimed and 0 unacknowledged messages",
    ]
    # The running run is watched: a message popped and never recorded is found soon.
    assert reaper.recovering
    assert reaper.reap_dead() == 0  # forgotten: once


def test_a_dead_workers_tag_that_a_live_worker_took_again_stays_with_it(
    svc: Services, client: redis.Redis, lost: LostRun, kombu_workers: KombuWorkers,
) -> None:
    """kombu's visibility sweep put back a message a dead worker held, and a live worker took
    it again: a restored message keeps its delivery tag, so the dead worker's held set still
    names the live delivery. Reaping the dead worker leaves it with the live one (restored,
    it ran twice: a metric-day fetched a third time after a SIGKILL)."""
    accounts = lost.queue("accounts")
    svc.transport.publish([lost.delivery(lost.a2)])
    taken = kombu_workers.take(accounts)  # the live delivery, held by this process
    tag = taken.delivery_tag
    client.sadd(keys.worker_held("w-dead"), tag)  # what the dead worker held before
    beat(client, "w-dead", at=float(client.time()[0]) - 60)
    beat(client, worker_id())
    reaper = Reaper(svc, vt(svc), workers=kombu_workers.hooks)

    assert reaper.reap_dead() == 1

    assert client.llen(accounts) == 0
    assert kombu_workers.hooks.unacked() == 1
    assert client.sismember(keys.worker_held(worker_id()), tag)
    assert client.zrange(keys.WORKERS, 0, -1) == [worker_id()]


def test_a_dead_worker_is_put_back_by_one_reaper_only(
    svc: Services, client: redis.Redis, lost: LostRun, kombu_workers: KombuWorkers
) -> None:
    days = lost.queue("metric_day")
    svc.transport.publish([lost.delivery(d) for d in lost.days])
    claimer(svc, "w-dead").claim(days, 1)
    client.zadd(keys.WORKERS, {"w-dead": 1000.0})
    other = RedisBrokerHooks(kombu_workers.app, client, Liveness(client, 600))
    other.me = "another-reaper"
    assert other.take("w-dead")  # another worker's reaper is on it

    reaper = Reaper(svc, vt(svc), workers=kombu_workers.hooks)
    assert reaper.reap_dead() == 0
    assert client.llen(days) == 1 and client.zcard(keys.claimed(days)) == 1
    assert not reaper.recovering


def test_after_an_outage_no_worker_is_found_dead_until_all_could_beat_again(
    svc: Services, client: redis.Redis, lost: LostRun, kombu_workers: KombuWorkers
) -> None:
    """Redis was down for longer than the heartbeat TTL: every last beat is old, and none of
    those workers died of it. The reaper waits one TTL for them to beat again."""
    days = lost.queue("metric_day")
    svc.transport.publish([lost.delivery(d) for d in lost.days])
    claimer(svc, "w-quiet").claim(days, 1)
    client.zadd(keys.WORKERS, {"w-quiet": float(client.time()[0]) - 60})
    since = FakeClock(1000.0)
    reaper = Reaper(svc, vt(svc), workers=kombu_workers.hooks, monotonic=since)

    reaper.unreachable()
    reaper.probe()
    since.now += HEARTBEAT_TTL_S - 0.1
    assert reaper.reap_dead() == 0
    assert client.zcard(keys.claimed(days)) == 1
    since.now += 0.1  # it did not beat again in a whole TTL: dead
    assert reaper.reap_dead() == 1
    assert client.zcard(keys.claimed(days)) == 0 and client.llen(days) == 2


def test_probes_far_apart_are_an_outage_for_liveness(
    svc: Services, client: redis.Redis, kombu_workers: KombuWorkers
) -> None:
    """This process stalled (or Redis hung) between two probes: beats may have stopped for
    every worker, as in an outage."""
    client.zadd(keys.WORKERS, {"w-quiet": float(client.time()[0]) - 60})
    since = FakeClock(1000.0)
    reaper = Reaper(svc, vt(svc), workers=kombu_workers.hooks, monotonic=since)
    reaper.probe()
    since.now += PROBE_GAP_S + 0.1
    reaper.probe()

    assert reaper.reap_dead() == 0
    since.now += HEARTBEAT_TTL_S
    assert reaper.reap_dead() == 1


def test_a_stalled_run_does_not_republish_what_a_live_worker_holds(
    svc: Services, demo: Pipeline, client: redis.Redis, lost: LostRun,
    kombu_workers: KombuWorkers,
) -> None:
    """A task running longer than the visibility timeout: its message is unacknowledged, its
    queue empty, its run without progress for two timeouts. It is not lost."""
    svc.transport.publish([lost.delivery(lost.a2)])
    running = kombu_workers.take(lost.queue("accounts"))
    assert client.llen(lost.queue("accounts")) == 0
    reaper = Reaper(svc, vt(svc), clock=FakeClock(lost.progress_at + 2 * vt(svc)),
                    workers=kombu_workers.hooks)

    assert reaper.sweep() == 4  # the services and the days, not a2

    assert depths(client, demo) == {"accounts": 0, "services": 2, "metric_day": 2}
    running.ack()


def test_finished_runs_and_runs_of_unloaded_pipelines_are_left_alone(
    svc: Services, demo: Pipeline, client: redis.Redis
) -> None:
    assert svc.ledger.runs.create("run-done", "demo", {}, "accounts", []) is True
    assert svc.ledger.runs.create("run-alien", "not_loaded", {}, "accounts",
                                 [("accounts:x", {"account": "x"})]) is True
    progress = float(client.hget(RunKeys.of("run-alien").run, "progress_at"))
    reaper = Reaper(svc, vt(svc), clock=FakeClock(progress + 10 * vt(svc)))

    assert reaper.sweep() == 0

    assert depths(client, demo) == {"accounts": 0, "services": 0, "metric_day": 0}
    assert client.hget(RunKeys.of("run-alien").run, "progress_at") == str(
        client.hget(RunKeys.of("run-alien").run, "created_at"))


def test_a_batch_map_left_deciding_by_a_dead_worker_is_settled(svc: Services) -> None:
    """The worker that finished batch 1 died before checking the switch and publishing batch
    2: the sweep does both."""
    load_configured_pipelines()
    stage = get_pipeline("demo").stages["metric_day"]
    ledger = svc.ledger
    assert ledger.runs.create(RUN, "demo", {}, "metric_day", [], hold=True)
    payloads = [{"account": "a", "service": "s", "day": f"2024-01-0{i}"} for i in (1, 2)]
    ids = [item_id("metric_day", RUN, i, p) for i, p in enumerate(payloads)]
    first = ledger.maps.create(RUN, "m1", stage.task_name, "metric_day", 1, None, False,
                             list(zip(ids, payloads, strict=True)), as_roots=True)
    assert [i for i, _ in first] == [ids[0]]
    done = Finish(RUN, "metric_day", ids[0], Outcome.SUCCEEDED)
    codes, signals = ledger.items.finish_batch([done])
    assert codes == [1] and [s.deciding for s in signals] == [True]  # ... and the worker dies
    assert ledger.maps.deciding(RUN) == ["m1"]
    progress_at = float(str(svc.ledger.redis.hget(RunKeys.of(RUN).run, "progress_at")))

    Reaper(svc, vt(svc), clock=FakeClock(progress_at + 2 * vt(svc))).sweep()

    assert ledger.maps.deciding(RUN) == []
    queued = [decode_redis(m) for m in svc.ledger.redis.lrange(stage.queue, 0, -1)]
    assert [d.item_id for d in queued] == [ids[1]]  # batch 2, published once
