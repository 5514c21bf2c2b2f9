"""fanout's Redis transport: kombu's, minus a client construction per broker operation.

kombu's Redis channel builds a new ``redis.Redis`` object (sharing one connection pool) for
every publish, ack and unacked bookkeeping step. With redis-py 8 that costs ~0.4 ms of CPU
each, several times per message, on the worker's single consumer thread: it capped a worker
near 100 messages/s. A ``redis.Redis`` object is thread-safe, so one per channel serves all.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # BRPOP/LISTEN connections: kombu manages these itself
            return super()._create_client(asynchronous=True)
        if self._shared_client is None:
            self._shared_client = super()._create_client()
        return self._shared_client

    def _disconnect_pools(self) -> None:
        self._shared_client = None
        super()._disconnect_pools()


class Transport(kombu_redis.Transport):
    Channel = Channel


#: ``broker_transport`` for Celery when the broker is Redis.
TRANSPORT = "workers.broker:Transport"
