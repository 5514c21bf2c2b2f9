"""fanout's Redis transport: kombu's, with one shared client, and bad messages set aside.

kombu's Redis channel builds a new ``redis.Redis`` object (sharing one connection pool) for
every publish, ack and unacked bookkeeping step. With redis-py 8 that costs ~0.4 ms of CPU
each, several times per message, on the worker's single consumer thread: it capped a worker
near 100 messages/s. A ``redis.Redis`` object is thread-safe, so one per channel serves all.

kombu also decodes a popped message outside any guard: one item on a queue that is not JSON,
not kombu's envelope, or a base64 body that is not base64, raised in the consumer and killed
the worker (the item lost: popped, not yet unacked), and the next worker took the next bad
item. Here such an item becomes a dead letter and the worker goes on; what Celery cannot run
in a message kombu can make is the consumer's to set aside (``consumer.py``).

kombu does not record which worker holds an unacknowledged message, so a dead worker's
messages came back only after the visibility timeout, and a live worker's task running longer
than that ran twice. ``QoS`` records each delivery tag in its worker's held set in the same
MULTI as kombu's own entry (``keys.worker_held``), and ``held_tags`` gives the heartbeat what
this process's open channels hold (``workers/liveness.py``).

kombu's pool for a channel's commands (acks, publishes, task events) holds 10 connections and
then raises "Too many connections": a worker of 256 threads acking at once lost its consumer.
Here it is sized by the transport option ``max_connections`` (the worker sets it from its
threads, ``app.size_pools``) and waits for a free connection instead.

A stage queue is several lists, one lane per run waiting (kombu's priority steps,
``transport.py``). kombu's BRPOP names them in step order, so lane 0 would always be served
first: here each BRPOP names them in a fresh random order, so the messages Celery consumes
one at a time come from every waiting run alike, as the claims do.
"""

from __future__ import annotations

import contextlib
import random
import weakref
from collections.abc import Sequence
from queue import Empty
from time import monotonic, time
from typing import Any

import redis
from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from workers import keys
from workers.connections import POOL_WAIT_S
from workers.engine.services import services
from workers.liveness import worker_id
from workers.message import (
    BadMessage,
    content_type_problem,
    envelope_problem,
    parse_envelope,
)


def _envelope_or_dead_letter(queue: str, raw: str) -> dict[str, Any] | None:
    """The envelope kombu can turn into a message and keep unacked, or None once ``raw`` is
    kept as a dead letter: this runs between BRPOP and kombu's ``Message``, where anything
    raised would kill the worker and lose the item (popped, not yet unacked)."""
    try:
        envelope = parse_envelope(raw)
        problem = envelope_problem(envelope)
    except BadMessage as exc:
        problem = exc.reason
    if problem is None and queue.startswith(f"{keys.PREFIX}."):
        problem = content_type_problem(envelope)
    if problem is None:
        return dict(envelope)
    services().dead_letters.add(queue, raw, problem)
    return None


#: Every QoS of this process, for ``held_tags`` (a closed channel's is skipped).
_QOS: weakref.WeakSet[QoS] = weakref.WeakSet()


class QoS(kombu_redis.QoS):
    """kombu's unacked bookkeeping, with each delivery tag also in its worker's held set."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _QOS.add(self)

    def append(self, message: Any, delivery_tag: str) -> None:
        # kombu 5.7's own, with the SADD in the same MULTI: a tag is never unacked unheld.
        # The set goes when its last tag is acked (prefetch 1: often), so each SADD that
        # makes it again gives it the TTL the heartbeat renews: no key lives without one.
        delivery = message.delivery_info
        raw = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        held = keys.worker_held(worker_id())
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time()}) \
                .hset(self.unacked_key, delivery_tag, raw) \
                .sadd(held, delivery_tag) \
                .expire(held, services().settings.ledger_ttl_s) \
                .execute()
            virtual.QoS.append(self, message, delivery_tag)

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        # On ack, reject and restore. A tag another worker restores leaves that worker's own
        # (a no-op); the heartbeat drops it from its holder's held set.
        return super()._remove_from_indices(delivery_tag, pipe) \
            .srem(keys.worker_held(worker_id()), delivery_tag)

    def restore_unless_held(self, tag: str, client: Any, live_held: Sequence[str]) -> bool:
        """kombu's ``restore_by_tag`` for a dead worker's tag, unless a live worker holds that
        tag now (one of the ``live_held`` sets). A restored message keeps its delivery tag: once
        kombu's visibility sweep has put it back and a live worker took it, the dead worker's
        held set still names the tag, and restoring it again would run a second copy beside
        the live one. A WATCH transaction, like kombu's: a delivery recorded meanwhile (its
        unacked entry and held set in one MULTI) makes it look again. Returns whether the
        message went back."""

        def restore(pipe: Any) -> bool:
            raw = pipe.hget(self.unacked_key, tag)
            held_live = any(pipe.sismember(held, tag) for held in live_held)
            if raw is None or held_live:
                return False
            pipe.multi()
            pipe.zrem(self.unacked_index_key, tag).hdel(self.unacked_key, tag)
            message, exchange, routing_key = loads(bytes_to_str(raw))
            self.channel._do_restore_message(message, exchange, routing_key, pipe)
            return True

        return bool(client.transaction(restore, self.unacked_key, value_from_callable=True))

    def tags(self) -> list[str]:
        """The delivery tags this channel holds (read from another thread: kombu's consumer
        thread may change the dict meanwhile, so the read is tried again)."""
        for _ in range(10):
            try:
                return list(self._delivered)
            except RuntimeError:  # changed size during iteration
                continue
        return []


def held_tags() -> list[str]:
    """The delivery tags this process's open channels hold."""
    for _ in range(10):
        try:  # a channel opened meanwhile changes the set
            channels = list(_QOS)
        except RuntimeError:
            continue
        return [tag for qos in channels if not qos.channel.closed for tag in qos.tags()]
    return []


class Channel(kombu_redis.Channel):
    QoS = QoS
    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # BRPOP/LISTEN connections: kombu manages these itself
            return super()._create_client(asynchronous=True)
        if self._shared_client is None:
            self._shared_client = super()._create_client()
        return self._shared_client

    def _get_pool(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # kombu's own, for its BRPOP connection
            return super()._get_pool(asynchronous=True)
        params = self._connparams()
        self.keyprefix_fanout = self.keyprefix_fanout.format(db=params["db"])
        return redis.BlockingConnectionPool(timeout=POOL_WAIT_S, **params)

    def _disconnect_pools(self) -> None:
        self._shared_client = None
        super()._disconnect_pools()

    def close(self) -> None:
        # kombu's close first reads the reply of a BRPOP still in flight. With the server gone
        # that raised before the channel was closed, and Celery then closed it a second time
        # after releasing the transport: an AttributeError that killed the worker on a Redis
        # restart. The reply is read here, a connection error ignored: the channel then closes.
        if self._in_poll:
            with contextlib.suppress(Empty, *self.connection_errors):
                self._brpop_read()
        super().close()

    def _brpop_start(self, timeout: Any = None) -> None:
        # kombu 5.7's own, with the lanes (priority steps) in a random order each time.
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        lanes = random.sample(self.priority_steps, len(self.priority_steps))
        keys_ = [self._q_for_pri(queue, pri) for pri in lanes for queue in queues]
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]  # kombu declares it None
        command_args = ["BRPOP", *keys_, timeout or 0]
        if self.global_keyprefix:
            command_args = self.client._prefix_args(command_args)
        self.client.connection.send_command(*command_args)

    def _brpop_read(self, **options: Any) -> bool:
        # kombu 5.7's own, but the popped item is checked before it is delivered.
        try:
            try:
                dest__item = self.client.parse_response(
                    self.client.connection, "BRPOP", **options
                )
            except self.connection_errors:
                # Disconnect, so the next iteration reconnects.
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            envelope = _envelope_or_dead_letter(dest, bytes_to_str(item))
            if envelope is not None:
                self.connection._deliver(envelope, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # what kombu itself resets it to
            self._flush_brpop_reauth()


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = "workers.broker:Transport"


def install() -> None:
    """Serve ``redis://`` and ``rediss://`` broker URLs with this transport in this process,
    through kombu's own table of transport aliases. (Naming the class in ``broker_transport``
    instead made kombu write it as the URL's scheme, and Flower then could not tell the
    broker was Redis: no queue view.)"""
    TRANSPORT_ALIASES["redis"] = TRANSPORT
    TRANSPORT_ALIASES["rediss"] = TRANSPORT
