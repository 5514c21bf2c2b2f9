"""The reaper: puts back what dead workers held, and publishes again the items whose message
was lost, on any broker.

A dead worker (``workers/liveness.py``: no heartbeat for 10 s) held messages no one else
will run: kombu's unacknowledged ones (its running and prefetched tasks) and the batches it
claimed. At every probe (``PROBE_S``) each worker's reaper looks for dead workers; one takes
each (``WorkerHooks.take``), puts back its claims (``lua/restore_claimed.lua``, by owner) and
its unacknowledged messages (kombu's own ``restore_by_tag``, for its held tags), forgets it,
and watches the running runs as after an outage (below): kombu pops a message before it
records it as unacked, and one popped in the instant of the kill is on no queue. A live
worker renews the lease of what it holds at every beat, so nothing it holds is put back,
whatever its age.

A message can also be lost between the ledger and the broker: a worker SIGKILLed between
kombu's pop and its record, a RabbitMQ queue purged, a producer dead between registering
items and publishing them. The ledger still has every pending item with its payload. So a
run that has made no progress for two visibility timeouts is checked: its pending items
whose stage queue is empty, that wait in no delayed set and that no worker holds
(unacknowledged or claimed: a live worker's long task) are on no queue and run nowhere, and
are published again. A duplicate is harmless: the item id makes it count once. One worker
at a time sweeps (a lock; the reaper that put a dead worker's work back takes it).

After an outage of Redis the wait would be needlessly long. When Redis dies, every connection
to it dies too, and what those connections had taken can no longer be acknowledged: the
messages running or prefetched (kombu's unacked hash) and the batches claimed
(``fanout:claimed:*``); their workers live on and keep beating, so liveness does not free
them, and kombu gives the first back only after the visibility timeout (and never, while a
renewed lease keeps it). So the reaper also probes Redis every
second (``PROBE_S``; while it is down it backs off and says so once, ``workers/outage.py``):
- when the broker server is a new one (its ``run_id`` changed: it restarted), every message
  taken before that server started belongs to a dead connection, and is put back at once
  (``recover``: claims through the transport, unacked messages through ``BrokerHooks``, which
  uses kombu's own restore);
- after any outage, restart or not, it watches the runs that were running, and sweeps a
  watched run as if stalled as soon as nothing is queued, claimed or unacked anywhere (no task
  runs then: its pending items that wait in no delayed set are lost), or else once it made no
  progress for ``RECOVERY_GRACE_S``. That finds what no restore can: a message popped in the
  instant the server died (kombu records it as unacked in a second step), a broker that lost
  its queues. A run stays watched until a sweep finds none of its pending items behind a
  non-empty queue, or for two visibility timeouts at most, when the rule above takes over.

The trade-offs. After a restart, restoring by time, not by owner: Celery drops what it had
reserved when it reconnects, so a live worker still owns orphans of its dead connection (its
heartbeat renews only what its open channels hold, so they are no longer renewed); no
connection from before survives, so "taken before the server started" names them exactly,
for every worker at once (each worker that sees the restart does it; a message is restored
once, atomically). Its cost: a task still running
across the restart gets a second copy of its message, which is harmless (the ledger counts an
item once, and a worker skips an item already terminal before any vendor call) and costs at
most one vendor call per message that was in flight. Without a restart (a network cut, a
paused server) connections may have survived, so nothing is restored by time (that would
copy the live work of every worker); only the watch runs, and it finds a lost item once its
run stops moving. The grace never copies an item a worker holds (unacknowledged or claimed),
however long it runs: only one that is on no queue and held by no worker.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Protocol

from workers import keys
from workers.api import all_pipelines, find_stage, get_pipeline
from workers.engine import batch_maps
from workers.engine.services import Services
from workers.ids import stage_of_item
from workers.ledger import MapSignal
from workers.liveness import HEARTBEAT_TTL_S
from workers.message import BadMessage, Delivery, decode_redis
from workers.outage import DOWN_ERRORS
from workers.outage import shared as shared_outage
from workers.settings import ConfigError

log = logging.getLogger("fanout.reaper")

#: How often the reaper looks at Redis, to notice an outage end or a restart.
PROBE_S = 1.0
#: After an outage, a run without progress for this long is swept (see the module docstring).
RECOVERY_GRACE_S = 5.0
#: Probes further apart than this mean this process stalled (or Redis hung): beats may have
#: stopped for it too.
PROBE_GAP_S = 3 * PROBE_S


class BrokerHooks(Protocol):
    """What the reaper asks of a Redis broker beyond the transport (``workers/app.py`` gives
    kombu's)."""

    def server(self) -> tuple[str, float]:
        """The broker server's run id and the seconds since it started."""
        ...

    def restore_unacked(self, delivered_before: float) -> int:
        """Put the messages delivered before that time and never acknowledged back on their
        queues. Returns how many."""
        ...

    def unacked(self) -> int:
        """How many messages are delivered and not yet acknowledged, on every queue."""
        ...


class WorkerHooks(Protocol):
    """What the reaper asks about the workers' liveness (``workers/app.py`` gives the Redis
    one, on ``workers/liveness.py`` and kombu's own restore)."""

    def dead(self) -> list[str]:
        """The ids of the workers whose heartbeat stopped."""
        ...

    def take(self, worker: str) -> bool:
        """Whether this process is the one to put back what ``worker`` held (one at a time)."""
        ...

    def claim_queues(self, worker: str) -> list[str]:
        """The queues ``worker`` claimed batches on (some may be of pipelines not loaded here)."""
        ...

    def restore_held(self, worker: str) -> int:
        """Put the unacknowledged messages ``worker`` held back on their queues. Returns how
        many."""
        ...

    def forget(self, worker: str) -> bool:
        """Forget a dead worker, once what it held is back; False if it beat again."""
        ...

    def unacked_items(self) -> set[tuple[str, str]]:
        """(run id, item id) of every message delivered and not yet acknowledged."""
        ...


class Reaper:
    def __init__(
        self, services: Services, visibility_timeout_s: float,
        clock: Callable[[], float] = time.time, broker: BrokerHooks | None = None,
        recovery_grace_s: float = RECOVERY_GRACE_S, workers: WorkerHooks | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.services = services
        self.workers = workers
        self.monotonic = monotonic
        self._last_probe: float | None = None
        self._beats_trusted_at = float("-inf")  # see probe
        self.stall_s = 2 * visibility_timeout_s
        self.clock = clock
        self.broker = broker
        self.recovery_grace_s = recovery_grace_s
        self._server: str | None = None  # the broker server's run id, last seen
        self._was_down = False
        self._watched: dict[str, float] = {}  # run id -> when its watch after an outage began

    @property
    def recovering(self) -> bool:
        """Whether runs are watched after an outage (the loop then sweeps every probe)."""
        return bool(self._watched)

    def unreachable(self) -> None:
        """Redis did not answer: recover once it does."""
        self._was_down = True

    def probe(self) -> int:
        """Look at Redis once; after an outage or a restart, ``recover``. Returns how many
        messages were put back."""
        now = self.monotonic()
        stalled = self._last_probe is not None and now - self._last_probe > PROBE_GAP_S
        self._last_probe = now
        if self._was_down or stalled:
            # Every worker's beats stopped with Redis (or this process was not looking): a
            # worker is found dead only once all had a heartbeat TTL to beat again.
            self._beats_trusted_at = now + HEARTBEAT_TTL_S
        if self.broker is None:
            self.services.ledger.redis.ping()
            server, taken_before = None, None
        else:
            server, uptime_s = self.broker.server()
            taken_before = self.clock() - uptime_s - 1.0  # uptime is whole seconds
        restarted = None not in (server, self._server) and server != self._server
        put_back = 0
        if restarted or self._was_down:
            put_back = self.recover(taken_before if restarted else None)
        # Only once recovered: should it fail, the next probe tries again.
        self._server, self._was_down = server or self._server, False
        return put_back

    def recover(self, taken_before: float | None) -> int:
        """After an outage: put back what was taken before ``taken_before`` (the start of a
        restarted server; None when it did not restart), and watch every running run."""
        put_back = 0
        if taken_before is not None:
            put_back = self.services.transport.restore_claims(self._claim_queues(), taken_before)
            if self.broker is not None:
                put_back += self.broker.restore_unacked(taken_before)
        watched = self._watch_running()
        log.info("after the outage: %s; watching %d running runs for lost work",
                 "Redis did not restart" if taken_before is None else
                 f"put back {put_back} messages taken before Redis restarted", watched)
        return put_back

    def reap_dead(self) -> int:
        """Put back what each dead worker held (its claimed batches, its unacknowledged
        messages), forget it, and watch the running runs as after an outage: a message it
        had popped and not yet recorded is on no queue, and is found once its run stops
        moving. Returns how many dead workers this reaper took care of."""
        if self.workers is None or self.monotonic() < self._beats_trusted_at:
            return 0
        reaped = 0
        for worker in self.workers.dead():
            if not self.workers.take(worker):
                continue  # another worker's reaper puts it back
            queues = sorted({*self._claim_queues(), *self.workers.claim_queues(worker)})
            claims = self.services.transport.restore_claims(queues, dead=[worker])
            unacked = self.workers.restore_held(worker)
            self.workers.forget(worker)
            # A worker stopped by SIGTERM gave everything back itself: that is no news.
            log.log(logging.WARNING if claims or unacked else logging.INFO,
                    "worker %s died: put back %d claimed and %d unacknowledged messages",
                    worker, claims, unacked)
            reaped += 1
        if reaped:
            self._watch_running()
        return reaped

    def _watch_running(self) -> int:
        """Watch every running run (see ``sweep``). Returns how many."""
        now = self.clock()
        runs = [run_id for run_id, _, _ in self.services.ledger.runs.running()]
        for run_id in runs:
            self._watched.setdefault(run_id, now)
        return len(runs)

    def sweep(self) -> int:
        """Republish the lost items of every stalled run (and, after an outage, of every
        watched run once nothing is in flight or it made no progress for the grace). Returns
        how many."""
        now = self.clock()
        republished = 0
        running = self.services.ledger.runs.running()
        quiet: bool | None = None  # asked once, if a watched run is idle but within its grace
        for run_id, pipeline, progress_at in running:
            idle_s = now - progress_at
            watched = run_id in self._watched
            due = idle_s >= self.stall_s or (watched and idle_s >= self.recovery_grace_s)
            if watched and not due:
                quiet = self._quiet() if quiet is None else quiet
                due = quiet
            if due:
                count, behind_busy = self._sweep_run(run_id, pipeline, now)
                republished += count
                if watched and not behind_busy:
                    del self._watched[run_id]
        live = {run_id for run_id, _, _ in running}
        self._watched = {
            run_id: since for run_id, since in self._watched.items()
            if run_id in live and now - since < self.stall_s
        }
        return republished

    def _quiet(self) -> bool:
        """Nothing queued, claimed or delivered anywhere: then no task runs, and a watched
        run's pending items that wait in no delayed set are lost, grace or not. Queues are
        read first: a message moves from a queue to the unacked set, so it is seen in one."""
        if self.broker is None:
            return False
        queues = [s.queue for p in all_pipelines() for s in p.stages.values()]
        if any(self.services.transport.queue_depth(q) > 0 for q in queues):
            return False
        return self.broker.unacked() == 0

    def _held_items(self) -> set[tuple[str, str]]:
        """(run id, item id) of every message a worker holds: delivered and unacknowledged,
        or claimed. A live worker runs them (a dead one's come back on their queue)."""
        items = self.workers.unacked_items() if self.workers is not None else set()
        for raw in self.services.transport.claimed_messages(self._claim_queues()):
            try:
                delivery = decode_redis(raw)
            except BadMessage:
                continue  # its worker dead-letters it
            items.add((delivery.run_id, delivery.item_id))
        return items

    @staticmethod
    def _claim_queues() -> list[str]:
        return [s.queue for p in all_pipelines() for s in p.stages.values() if s.claim_batch > 1]

    def _sweep_run(self, run_id: str, pipeline_name: str, now: float) -> tuple[int, bool]:
        """Publish the lost items of one run: pending, on no queue, in no delayed set, and
        held by no worker. Returns how many, and whether some of its pending items were
        left alone because their stage queue was not empty. Read in the order a message
        moves (delayed set -> queue -> a worker), so one that moves meanwhile is seen in the
        later place: read the other way round, a message taken off its queue between the
        two reads was in neither, and ran twice."""
        ledger, transport = self.services.ledger, self.services.transport
        try:
            pipeline = get_pipeline(pipeline_name)
        except ConfigError:
            return 0, False  # not loaded in this worker: another one sweeps it
        pending = ledger.items.pending_payloads(run_id)
        waiting = self.services.scheduler.waiting_items(run_id, now - self.stall_s)
        loops = ledger.loops.states(run_id)
        busy = {s.name for s in pipeline.stages.values() if transport.queue_depth(s.queue) > 0}
        held = self._held_items()
        lost: dict[str, list[Delivery]] = defaultdict(list)
        behind_busy = False
        for item, payload in pending.items():
            stage_name = stage_of_item(item)
            stage = find_stage(f"{pipeline_name}.{stage_name}")
            behind_busy = behind_busy or (stage is not None and stage_name in busy)
            if stage is None or stage_name in busy or item in waiting or (run_id, item) in held:
                continue
            loop = loops.get(item) or {}  # a looping item resumes at its current iteration
            lost[stage_name].append(Delivery(
                stage.task_name, run_id, item, payload, int(loop.get("iteration", 1)),
                loop.get("payload"),
            ))
        for stage_name, deliveries in lost.items():
            log.warning("run %s: publishing %d lost %s items again", run_id, len(deliveries),
                        stage_name)
            transport.publish(deliveries)
        # A batch map whose completed batch was never settled: its worker died between the
        # ledger's word and the switch check. Decide now (once: settling is idempotent).
        stuck = ledger.maps.deciding(run_id)
        if stuck:
            log.warning("run %s: settling %d batch maps left deciding", run_id, len(stuck))
            batch_maps.settle(self.services, [MapSignal(run_id, m, True) for m in stuck])
        ledger.runs.touch(run_id)
        return sum(len(d) for d in lost.values()), behind_busy


def start_reaper(
    services: Services, visibility_timeout_s: int, broker: BrokerHooks | None = None,
    workers: WorkerHooks | None = None,
) -> threading.Thread:
    """Sweep a few times per visibility timeout, in a daemon thread of the worker; the one
    holding ``keys.REAPER_LOCK`` sweeps. Probe Redis every ``PROBE_S`` in between (backing
    off while it is down), recover after an outage, and put back what dead workers held (see
    the module docstring)."""
    interval_s = max(1.0, min(30.0, visibility_timeout_s / 3))
    reaper = Reaper(services, float(visibility_timeout_s), broker=broker, workers=workers)
    owner = f"{socket.gethostname()}:{os.getpid()}"
    client = services.ledger.redis
    outage = shared_outage(client)

    def holds_lock() -> bool:
        if client.set(keys.REAPER_LOCK, owner, nx=True, ex=max(1, int(interval_s))):
            return True
        # While watching runs after an outage, the holder sweeps at every probe.
        return reaper.recovering and client.get(keys.REAPER_LOCK) == owner

    def loop() -> None:
        delay_s, next_sweep = PROBE_S, time.monotonic() + interval_s
        while True:
            time.sleep(delay_s)
            delay_s = PROBE_S
            try:
                reaper.probe()
                outage.ok()
                if reaper.reap_dead():
                    # The reaper that put a dead worker's work back watches for what it lost:
                    # it sweeps now, whoever held the lock.
                    client.set(keys.REAPER_LOCK, owner, ex=max(1, int(interval_s)))
                due = time.monotonic() >= next_sweep
                if due or reaper.recovering:
                    if due:
                        next_sweep = time.monotonic() + interval_s
                    if holds_lock():
                        reaper.sweep()
            except DOWN_ERRORS as exc:
                reaper.unreachable()
                delay_s = outage.failed(exc)
            except Exception:  # the reaper must outlive any error
                log.exception("reaper sweep failed")

    thread = threading.Thread(target=loop, name="fanout-reaper", daemon=True)
    thread.start()
    return thread
