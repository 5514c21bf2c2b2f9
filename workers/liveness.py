"""Worker liveness: who is alive, and what each worker holds, so a dead worker's work comes
back in seconds and a live worker's long task is never handed to another.

Each process that consumes or claims has an id (``worker_id``: host:pid:random) and beats
every ``HEARTBEAT_S`` (``start_heartbeat``): one Lua call (``lua/heartbeat.lua``) sets its
entry in the workers index (``keys.WORKERS``) to the server's time and moves kombu's
delivery time of every message it holds to now, so kombu's visibility-timeout restore never
takes a message from a worker that lives. A worker silent for ``HEARTBEAT_TTL_S`` is dead
(``dead``): the reaper puts back what it held (``held``: kombu's delivery tags, recorded by
``broker.py``'s QoS; its claimed batches, on the queues ``claim_queues`` names, recorded by
``lua/claim.lua``), then ``forget``s it.

One sorted set of last beats rather than a key per worker with a TTL: "who is dead" is then
one command for every worker, and a process that claims without ever beating (a producer, a
test) is in it from its first claim, so its claims come back too.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Sequence

import redis

from workers import keys, scripts
from workers.outage import DOWN_ERRORS

log = logging.getLogger("fanout.liveness")

#: How often a worker beats.
HEARTBEAT_S = 1.0
#: A worker whose last beat is older than this is dead (ten beats missed: a busy process
#: still beats, its GIL is released every few milliseconds).
HEARTBEAT_TTL_S = 10


@functools.cache
def _id_of(pid: int) -> str:
    return f"{socket.gethostname()}:{pid}:{secrets.token_hex(4)}"


def worker_id() -> str:
    """This process's worker id (a forked child has its own)."""
    return _id_of(os.getpid())


class Liveness:
    """The workers index and the held sets, on the broker's Redis (``keys.WORKERS``,
    ``keys.worker_held``). ``ttl_s``: how long the index and a held set outlive the last
    beat of any worker (long: what a dead worker held must still be known when one starts)."""

    def __init__(
        self, client: redis.Redis, ttl_s: int, unacked_index_key: str = "unacked_index",
        heartbeat_ttl_s: float = HEARTBEAT_TTL_S,
    ) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.unacked_index_key = unacked_index_key
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self._beat = scripts.load("heartbeat")
        self._dead = scripts.load("dead_workers")
        self._forget = scripts.load("forget_worker")

    def beat(self, worker: str, tags: Sequence[str]) -> int:
        """``worker`` is alive, and holds ``tags``: renew their leases. Returns how many."""
        keys_ = {"workers": keys.WORKERS, "held": keys.worker_held(worker),
                 "unacked_index": self.unacked_index_key}
        return int(self._beat(self.redis, keys_, [worker, self.ttl_s, *tags]))

    def dead(self) -> list[str]:
        """The workers whose last beat is older than the heartbeat TTL."""
        found = self._dead(self.redis, {"workers": keys.WORKERS}, [self.heartbeat_ttl_s])
        return [str(w) for w in found]

    def alive(self) -> list[str]:
        """The workers whose last beat is within the heartbeat TTL."""
        dead = set(self.dead())
        return [w for w in map(str, self.redis.zrange(keys.WORKERS, 0, -1)) if w not in dead]

    def held(self, worker: str) -> list[str]:
        """The kombu delivery tags ``worker`` holds (or held when it died)."""
        return [str(t) for t in self.redis.smembers(keys.worker_held(worker))]

    def claim_queues(self, worker: str) -> list[str]:
        """The queues ``worker`` claimed batches on."""
        return sorted(str(q) for q in self.redis.smembers(keys.worker_queues(worker)))

    def forget(self, worker: str) -> bool:
        """Drop a dead worker from the index, with its held set and its claimed-on queues;
        False when it beat again."""
        keys_ = {"workers": keys.WORKERS, "held": keys.worker_held(worker),
                 "queues": keys.worker_queues(worker)}
        return bool(self._forget(self.redis, keys_, [worker, self.heartbeat_ttl_s]))


_started: dict[int, threading.Thread] = {}
_start_lock = threading.Lock()


def start_heartbeat(
    liveness: Liveness, held_tags: Callable[[], Sequence[str]] = tuple,
    each_beat: Callable[[], object] = lambda: None,
) -> threading.Thread:
    """Beat once now (so the worker is known before it takes any message), then every
    ``HEARTBEAT_S`` in a daemon thread; ``held_tags`` gives the delivery tags this process
    holds at that moment; ``each_beat`` is called after each beat (the transport settles
    the claims Redis refused to release). Once per process: a second call returns the
    running thread."""
    with _start_lock:
        running = _started.get(os.getpid())
        if running is not None and running.is_alive():
            return running
        me = worker_id()

        def beat() -> None:
            try:
                liveness.beat(me, held_tags())
                each_beat()
            except DOWN_ERRORS:
                pass  # the reaper reports the outage; the next beat tries again
            except Exception:  # the heartbeat must outlive any error
                log.exception("heartbeat failed")

        def loop() -> None:
            stop = threading.Event()
            while not stop.wait(HEARTBEAT_S):
                beat()

        beat()
        thread = threading.Thread(target=loop, name="fanout-heartbeat", daemon=True)
        thread.start()
        _started[os.getpid()] = thread
        return thread
