"""The reaper: publishes again the items whose message was lost, on any broker.

A message can be lost between the ledger and the broker: kombu's Redis transport pops a
message before it records it as unacked (a worker SIGKILLed in between loses it), a RabbitMQ
queue can be purged, a producer can die between registering items and publishing them. The
ledger still has every pending item with its payload. So a run that has made no progress
for two visibility timeouts is checked: no task runs longer than one, and a dead worker's
unacked or claimed messages are back on their queue after one (kombu restores unacked ones;
this reaper puts back claims first). Its pending items whose stage queue is empty and that wait
in no delayed set are then on no queue and run nowhere, and are published again. A duplicate
is harmless: the item id makes it count once. One worker at a time sweeps (a lock).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable

from workers import keys
from workers.api import all_pipelines, find_stage, get_pipeline
from workers.engine.services import Services
from workers.ids import stage_of_item
from workers.message import Delivery
from workers.settings import ConfigError

log = logging.getLogger("fanout.reaper")


class Reaper:
    def __init__(
        self, services: Services, visibility_timeout_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.services = services
        self.claim_timeout_s = visibility_timeout_s
        self.stall_s = 2 * visibility_timeout_s
        self.clock = clock

    def sweep(self) -> int:
        """Republish the lost items of every stalled run. Returns how many."""
        now = self.clock()
        restored = self.services.transport.restore_claims(
            [s.queue for p in all_pipelines() for s in p.stages.values() if s.claim_batch > 1],
            now - self.claim_timeout_s,
        )
        if restored:
            log.warning("put %d claimed messages back on their queues", restored)
        republished = 0
        for run_id, pipeline, progress_at in self.services.ledger.running_runs():
            if now - progress_at >= self.stall_s:
                republished += self._sweep_run(run_id, pipeline, now)
        return republished

    def _sweep_run(self, run_id: str, pipeline_name: str, now: float) -> int:
        ledger, transport = self.services.ledger, self.services.transport
        try:
            pipeline = get_pipeline(pipeline_name)
        except ConfigError:
            return 0  # not loaded in this worker: another one sweeps it
        pending = ledger.pending_payloads(run_id)
        waiting = self.services.scheduler.waiting_items(run_id, now - self.stall_s)
        loops = ledger.loop_states(run_id)
        busy = {s.name for s in pipeline.stages.values() if transport.queue_depth(s.queue) > 0}
        lost: dict[str, list[Delivery]] = defaultdict(list)
        for item, payload in pending.items():
            stage_name = stage_of_item(item)
            stage = find_stage(f"{pipeline_name}.{stage_name}")
            if stage is None or stage_name in busy or item in waiting:
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
        ledger.touch(run_id)
        return sum(len(d) for d in lost.values())


def start_reaper(services: Services, visibility_timeout_s: int) -> threading.Thread:
    """Sweep a few times per visibility timeout, in a daemon thread of the worker; the one
    holding ``keys.REAPER_LOCK`` sweeps."""
    interval_s = max(1.0, min(30.0, visibility_timeout_s / 3))
    reaper = Reaper(services, float(visibility_timeout_s))
    owner = f"{socket.gethostname()}:{os.getpid()}"
    client = services.ledger.redis

    def loop() -> None:
        while True:
            time.sleep(interval_s)
            try:
                if client.set(keys.REAPER_LOCK, owner, nx=True, ex=max(1, int(interval_s))):
                    reaper.sweep()
            except Exception:  # the reaper must outlive a Redis hiccup
                log.exception("reaper sweep failed")

    thread = threading.Thread(target=loop, name="fanout-reaper", daemon=True)
    thread.start()
    return thread
