"""Holding work to a global limit: what a vendor call or a stage does with ``limits.py``.

``Throttle.hold(name, holder)`` lets one call through the named limit: it takes from the
limit's rate (GCRA on Redis server time, shared by every worker on every host) and, when the
limit has concurrency slots, a leased slot for the length of the call (renewed while it runs,
released on every exit, expiring by itself if the worker dies). Short waits sleep in the
worker thread; a wait longer than ``short_wait_s`` raises ``Throttled``, and the engine puts the
item back in the scheduler for that long, counted ``throttled`` (not a retry): no thread sleeps
for minutes. ``push_back`` is the vendor's own 429/503: nothing passes the limit until its
Retry-After, for every worker, once. A limit nobody has set does not limit.

``hold_async`` is the same for a call on an event loop (``async def`` stages): its Redis calls
go through the loop's own asyncio client and its waits are ``asyncio.sleep``, so a call waiting
for its turn never blocks the other calls in flight, and goes out on its turn
(``Limits.acquire_async``). The calls of one loop waiting for a concurrency
slot queue at a local gate as wide as the limit (no process can hold more of its slots), so
a thousand calls in flight do not poll Redis for five slots.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from workers.connections import get_redis
from workers.limits import Lease, LimitConfig, LimitRef, Limits, label, resolve
from workers.settings import get_settings

SHORT_WAIT_S = 1.0
LEASE_S = 30.0
# GCRA spaces calls exactly 1/rate apart on Redis's clock, but they reach the vendor with a
# little jitter (thread wake-ups, the GIL): at exactly the rate, a vendor counting a sliding
# window sees rate + 1 calls in some second and answers 429. Calls go 5% slower than the rate:
# that absorbs 50 ms of jitter in any second, and a rate-limited run takes 5% longer than
# requests / rate. (Measured at the vendor, 3 workers x 4 threads at 50/s: steady gaps of
# 21.5 +/- 0.5 ms; 2% was not enough on a loaded 2-core machine.)
HEADROOM = 1.05
#: A call on an event loop waits up to this long for its turn before its item is run again
#: later: a waiting task costs the loop nothing, while an item put back and run again costs a
#: worker milliseconds of CPU. (With a 1 s wait, a claimed batch of hundreds of calls at
#: 100/s was mostly put back, over and over: 30 ms of worker CPU per call that went out.)
ASYNC_WAIT_S = 10.0
_CONFIG_TTL_S = 1.0  # a 'fanout limits set' reaches every worker within this
_SLOT_POLL_S = 0.05
_MAX_GATES = 1024  # gates kept per process before the idle ones are dropped


class Throttled(Exception):
    """The limit holds this work for ``wait_s``: run it again then."""

    def __init__(self, wait_s: float, reason: str) -> None:
        super().__init__(reason)
        self.wait_s = wait_s
        self.reason = reason


@dataclass(frozen=True)
class Turn:
    """What an async call holds of a limit: its slot's lease, and its place at this loop's
    gate of the limit (``Throttle.leave_turn`` gives both back)."""

    lease: Lease | None
    gate: asyncio.Semaphore | None


class Throttle:
    def __init__(
        self, limits: Limits, *, short_wait_s: float = SHORT_WAIT_S, lease_s: float = LEASE_S,
        clock: Callable[[], float] = time.monotonic, async_wait_s: float | None = None,
    ) -> None:
        self.limits = limits
        self.short_wait_s = short_wait_s
        # An auto limit's successes not yet reported (at the next turn), per limit or key.
        self._successes: dict[LimitRef, int] = {}
        self._counts_lock = threading.Lock()
        #: The longest wait for a rate's turn on an event loop (default: ``short_wait_s``).
        self.async_wait_s = short_wait_s if async_wait_s is None else async_wait_s
        self.lease_s = lease_s
        self.clock = clock
        self._configs: dict[str, tuple[float, LimitConfig | None]] = {}
        # Per event loop and limit (or key): (its concurrency when made, the gate).
        self._gates: dict[tuple[asyncio.AbstractEventLoop, LimitRef],
                          tuple[int, asyncio.Semaphore]] = {}

    def config(self, ref: LimitRef) -> LimitConfig | None:
        """The limit's configuration (a key's: its template's), read at most once a second
        per process. A bad reference (an empty key, say) is a ValueError."""
        name = resolve(ref)[0]
        now = self.clock()
        cached = self._configs.get(name)
        if cached is None or now - cached[0] > _CONFIG_TTL_S:
            cached = self._configs[name] = (now, self.limits.get(name))
        return cached[1]

    def take(self, name: LimitRef) -> LimitConfig | None:
        """One call's share of the limit's rate (and of any push-back in force): sleeps
        through a short wait, raises ``Throttled`` for a long one."""
        config = self.config(name)
        if config is None:
            return None
        permit = self.limits.acquire(name, max_wait_s=self.short_wait_s, headroom=HEADROOM,
                                     successes=self._reported(name, config))
        if not permit.allowed:
            raise Throttled(permit.wait_s, f"rate limit {label(name)}: wait {permit.wait_s:.2f}s")
        return config

    def enter(self, name: LimitRef, holder: str) -> Lease | None:
        """Take what one call needs from the limit (a slot stays held: ``leave``): the slot
        first, then the rate's turn (a turn taken before a wait for a slot would go late)."""
        config = self.config(name)
        if config is None:
            return None
        if config.concurrency is None:
            self.take(name)
            return None
        deadline = self.clock() + self.short_wait_s
        while not self.limits.acquire_slot(name, holder, self.lease_s):
            if self.clock() >= deadline:
                raise Throttled(self.short_wait_s, f"limit {label(name)}: every slot is taken")
            time.sleep(_SLOT_POLL_S)
        lease = Lease(name, holder, self.lease_s, self.limits.renew_slot)
        try:
            self.take(name)
        except BaseException:
            self.leave(lease)
            raise
        return lease

    def leave(self, lease: Lease | None) -> None:
        if lease is not None:
            lease.stop()
            self.limits.release_slot(lease.name, lease.holder_id)

    @contextmanager
    def hold(self, name: LimitRef, holder: str | None = None) -> Iterator[None]:
        lease = self.enter(name, holder or new_holder())
        try:
            yield
        finally:
            self.leave(lease)

    def push_back(self, name: LimitRef, retry_after_s: float) -> None:
        """The vendor said wait ``retry_after_s``: nobody passes ``name`` before then (an auto
        limit's rate is cut too: ``refused``)."""
        config = self.config(name)
        if config is not None:
            self.limits.push_back(name, retry_after_s, config)

    def refused(self, name: LimitRef, retry_after_s: float | None) -> None:
        """The vendor answered a call through ``name`` 429 or 503: push it back for the
        Retry-After, and cut an auto limit's rate (with or without a Retry-After)."""
        config = self.config(name)
        if config is not None and (retry_after_s is not None or config.auto is not None):
            self.limits.push_back(name, retry_after_s or 0.0, config)

    def answered(self, name: LimitRef, headers: Mapping[str, str] | None = None) -> None:
        """The vendor answered a call through ``name`` (anything but 429 or 503): an auto
        limit counts it, to raise its rate at this process's next turn (no round trip of its
        own), and a quota the vendor says is used up (``RateLimit-Remaining: 0``) pushes the
        limit back until its reset."""
        config = self._configs.get(resolve(name)[0], (0.0, None))[1]
        if config is None or config.auto is None:
            return
        with self._counts_lock:
            self._successes[name] = self._successes.get(name, 0) + 1
        wait_s = quota_reset_s(headers) if headers is not None else None
        if wait_s:
            self.limits.push_back(name, wait_s)

    def _reported(self, name: LimitRef, config: LimitConfig) -> int:
        """The successes counted for ``name`` since the last report, now reported."""
        if config.auto is None:
            return 0
        with self._counts_lock:
            return self._successes.pop(name, 0)

    # -- on an event loop -----------------------------------------------------------------

    async def config_async(self, ref: LimitRef) -> LimitConfig | None:
        """``config``, read on the loop's Redis client when it is due."""
        name = resolve(ref)[0]
        cached = self._configs.get(name)
        if cached is None or self.clock() - cached[0] > _CONFIG_TTL_S:
            found = await self.limits.get_async(name)
            cached = self._configs[name] = (self.clock(), found)
        return cached[1]

    async def take_async(self, name: LimitRef) -> LimitConfig | None:
        """``take`` without blocking the loop: a short wait is an ``asyncio.sleep``."""
        config = await self.config_async(name)
        if config is None:
            return None
        await self._take_async(name, config)
        return config

    async def _take_async(self, name: LimitRef, config: LimitConfig) -> None:
        permit = await self.limits.acquire_async(name, max_wait_s=self.async_wait_s,
                                                 headroom=HEADROOM, config=config,
                                                 successes=self._reported(name, config))
        if not permit.allowed:
            raise Throttled(permit.wait_s, f"rate limit {label(name)}: wait {permit.wait_s:.2f}s")

    async def enter_async(self, name: LimitRef, holder: str) -> Turn:
        """``enter`` without blocking the loop. Give the turn back with ``leave_turn``.

        The slot comes first, then the rate's turn: a call that took its turn and then waited
        for a slot would go out late and land next to the calls after it."""
        config = await self.config_async(name)
        if config is None:
            return Turn(None, None)
        if config.concurrency is None:
            await self._take_async(name, config)
            return Turn(None, None)
        deadline = self.clock() + self.short_wait_s
        gate = self._gate(name, config.concurrency)
        try:
            await asyncio.wait_for(gate.acquire(), self.short_wait_s)
        except TimeoutError:
            raise Throttled(self.short_wait_s,
                            f"limit {label(name)}: every slot is taken") from None
        lease = None
        try:
            while not await self.limits.acquire_slot_async(name, holder, self.lease_s, config):
                if self.clock() >= deadline:
                    raise Throttled(self.short_wait_s, f"limit {label(name)}: every slot is taken")
                await asyncio.sleep(_SLOT_POLL_S)
            lease = Lease(name, holder, self.lease_s, self.limits.renew_slot)
            await self._take_async(name, config)
        except BaseException:
            try:
                if lease is not None:
                    await asyncio.to_thread(self.leave, lease)
            finally:
                gate.release()
            raise
        return Turn(lease, gate)

    def leave_turn(self, turn: Turn) -> None:
        """Give back the slot (one short Redis call) and the place at the gate."""
        try:
            self.leave(turn.lease)
        finally:
            if turn.gate is not None:
                turn.gate.release()

    @asynccontextmanager
    async def hold_async(self, name: LimitRef, holder: str | None = None) -> AsyncIterator[None]:
        turn = await self.enter_async(name, holder or new_holder())
        try:
            yield
        finally:
            if turn.lease is not None:
                await asyncio.to_thread(self.leave, turn.lease)
            if turn.gate is not None:
                turn.gate.release()

    async def push_back_async(self, name: LimitRef, retry_after_s: float) -> None:
        config = await self.config_async(name)
        if config is not None:
            await self.limits.push_back_async(name, retry_after_s, config)

    async def refused_async(self, name: LimitRef, retry_after_s: float | None) -> None:
        """``refused`` on the loop's Redis client."""
        config = await self.config_async(name)
        if config is not None and (retry_after_s is not None or config.auto is not None):
            await self.limits.push_back_async(name, retry_after_s or 0.0, config)

    async def answered_async(self, name: LimitRef, headers: Mapping[str, str] | None) -> None:
        """``answered`` on the loop's Redis client."""
        config = self._configs.get(resolve(name)[0], (0.0, None))[1]
        if config is None or config.auto is None:
            return
        self._successes[name] = self._successes.get(name, 0) + 1  # the loop's one thread
        wait_s = quota_reset_s(headers) if headers is not None else None
        if wait_s:
            await self.limits.push_back_async(name, wait_s)

    def _gate(self, name: LimitRef, concurrency: int) -> asyncio.Semaphore:
        """This loop's gate of the limit, as wide as its slots (made anew when they change)."""
        key = (asyncio.get_running_loop(), name)
        found = self._gates.get(key)
        if found is None and len(self._gates) >= _MAX_GATES:
            # Keys come and go: drop the gates nobody holds or waits at.
            for idle in [k for k, (width, gate) in self._gates.items()
                         if gate._value == width and not gate.locked()]:
                del self._gates[idle]
        if found is None or found[0] != concurrency:
            found = self._gates[key] = (concurrency, asyncio.Semaphore(concurrency))
        return found[1]


def quota_reset_s(headers: Mapping[str, str]) -> float | None:
    """Seconds until the vendor's quota comes back when its headers say none is left
    (``RateLimit-Remaining: 0`` with ``RateLimit-Reset``, IETF; or the ``X-RateLimit-*``
    pair, whose reset may be an epoch time, as GitHub's), else None."""
    for prefix in ("ratelimit-", "x-ratelimit-"):
        remaining, reset = headers.get(prefix + "remaining"), headers.get(prefix + "reset")
        if remaining is None or reset is None:
            continue
        try:
            left, at = float(remaining), float(reset)
        except ValueError:
            continue
        if left > 0:
            return None
        if at > 1e9:  # an epoch time, not seconds from now
            at -= time.time()
        return min(max(at, 0.0), 3600.0) or None
    return None


_HOLDERS = itertools.count()
_HOST = socket.gethostname()


def new_holder() -> str:
    """A holder id no other call anywhere uses (host, process, counter)."""
    return f"{_HOST}:{os.getpid()}:{next(_HOLDERS)}"


@functools.cache
def _for_process(pid: int) -> Throttle:
    return Throttle(Limits(get_redis()), lease_s=get_settings().limit_lease_s,
                    async_wait_s=ASYNC_WAIT_S)


_lock = threading.Lock()


_throttles: dict[int, Throttle] = {}


def throttle() -> Throttle:
    """This process's throttle (a forked child makes its own)."""
    found = _throttles.get(os.getpid())
    if found is None:
        with _lock:
            found = _throttles.get(os.getpid())
            if found is None:
                found = _throttles[os.getpid()] = _for_process(os.getpid())
    return found


def rate_limit(name: LimitRef) -> None:
    """Prefect's ``rate_limit("github-api")`` inside a stage: wait for the global limit (a long
    wait runs the item again later, counted ``throttled``). ``rate_limit(("vendor-token",
    key))``: one key of a limit used per key."""
    throttle().take(name)


async def rate_limit_async(name: LimitRef) -> None:
    """``rate_limit`` inside an ``async def`` stage: ``await rate_limit_async("github-api")``
    waits without blocking the worker's event loop."""
    await throttle().take_async(name)
