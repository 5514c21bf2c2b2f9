"""The parts one process shares, built once from settings and passed to the engine: the
ledger, the transport, the scheduler, the dead letters and the sink."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from workers.connections import broker_redis, get_redis, resolve_broker_url
from workers.dead_letters import DeadLetters
from workers.engine.scheduler import Scheduler
from workers.ledger import Ledger
from workers.settings import Settings, get_settings
from workers.sinks import Sink, get_sink
from workers.transport import Transport, open_transport


@dataclass(frozen=True)
class Services:
    settings: Settings
    ledger: Ledger
    transport: Transport
    scheduler: Scheduler
    dead_letters: DeadLetters

    def sink(self) -> Sink:
        return get_sink()


def build(settings: Settings) -> Services:
    client = get_redis()
    broker_url = resolve_broker_url(settings)
    ttl_s = settings.ledger_ttl_s
    transport = open_transport(broker_url, broker_redis(broker_url), ttl_s)
    return Services(
        settings=settings,
        ledger=Ledger(client, ttl_s),
        transport=transport,
        scheduler=Scheduler(client, transport, ttl_s),
        dead_letters=DeadLetters(client, ttl_s),
    )


@functools.cache
def _for_process(pid: int) -> Services:
    return build(get_settings())


def services() -> Services:
    """This process's services (a forked child builds its own)."""
    return _for_process(os.getpid())
