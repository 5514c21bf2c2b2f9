"""The turns of a worker process's items in flight, shared between runs.

A process's async items wait here for a turn (``ProcessLoop.gate``). Turns go round-robin
between the runs that have items waiting, weighted by each run's priority (smooth weighted
round-robin, as the claims do between a queue's lanes), so the few items of a small run
claimed beside a backfill's thousands wait for a turn or two, not behind all of them.

How many turns there are (``limit``) is found as the process runs (``LimitFinder``): as
many items in flight as the process keeps up with, up to its bound (``FANOUT_MAX_IN_FLIGHT``).
More calls in flight than a process can serve add no throughput: their answers wait, read
late by a busy loop, and every call in flight waits with them, a small run's too (Little's
law: at 600 answers a second, 1,000 in flight take 1.7 s each, whatever the vendor's
latency). So the limit is cut (by 1/8, then not again before the turns held before the cut
have ended) when both signs say so: turns are held more than twice as long as unslowed (the
shortest tick of the last 20 s), and the loop is busy (its timer fires more than 10 ms late,
the median of 5 ticks). A slower vendor alone holds turns longer on an idle loop, and cuts
nothing. While items wait for turns, the limit grows: x2 a tick from 8 at first, then by 1/4
a tick while the loop has been idle for 5 ticks (whatever holds the turns: items waiting for
a limit's turn must not keep others from theirs), by 1/16 while turns are not slowed.
Items that wait for a turn cost nothing but their place in the queue.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time

#: How often the limit is looked at.
TICK_S = 0.1
#: The loop's lag (the median of the last LAG_TICKS ticks) above which it is busy, and below
#: which it is idle.
BUSY_LAG_S = 0.01
IDLE_LAG_S = 0.005
LAG_TICKS = 5
#: Turns held SLOWED times their unslowed time (the shortest of the last BASE_TICKS ticks)
#: are slowed by the process; below GROW_BELOW times it the limit may grow.
SLOWED = 2.0
GROW_BELOW = 1.5
BASE_TICKS = 200
HOLD_WEIGHT = 0.3  # of a tick's mean hold in the moving average
CUT_GAP_TICKS = 10  # at most: a cut waits for the turns held before it to end
#: The fewest turns the limit goes down to, and the first limit (x2 a tick from there).
FLOOR = 8
START = 8


class FairGate:
    """Turns of items in flight, round-robin between runs by weight. Loop-thread only."""

    def __init__(self, bound: int, limit: int | None = None) -> None:
        self.bound = bound
        self.limit = min(bound, limit or bound)
        self.held = 0
        self._hold_sum, self._hold_count = 0.0, 0
        self._waiting: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._weight: dict[str, int] = {}
        self._credit: dict[str, int] = {}

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def turn(self, run_id: str, weight: int = 1) -> _Turn:
        """A turn for an item of ``run_id``, held for an ``async with`` block; its hold time
        is noted. (A class, not ``asynccontextmanager``: a fifth of the cost per item.)"""
        return _Turn(self, run_id, weight)

    def _held_for(self, seconds: float) -> None:
        self._hold_sum += seconds
        self._hold_count += 1
        self.release()

    def take_holds(self) -> float | None:
        """The mean hold of the turns that ended since the last call (None: none ended)."""
        count, total = self._hold_count, self._hold_sum
        self._hold_sum, self._hold_count = 0.0, 0
        return total / count if count else None

    async def acquire(self, run_id: str, weight: int = 1) -> None:
        if self.held < self.limit and not self._waiting:
            self.held += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(run_id, collections.deque()).append(future)
        self._weight[run_id] = max(1, weight)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # given a turn as it was cancelled: hand it on
            else:
                self._forget(run_id, future)
            raise

    def release(self) -> None:
        self.held -= 1
        self.wake()

    def wake(self) -> None:
        """Give the free turns to the runs waiting, by smooth weighted round-robin."""
        while self.held < self.limit and self._waiting:
            run_id = self._next_run()
            queue = self._waiting[run_id]
            future = queue.popleft()
            if not queue:
                self._drop(run_id)
            if future.done():  # cancelled while it waited
                continue
            future.set_result(None)
            self.held += 1

    def _next_run(self) -> str:
        if len(self._waiting) == 1:
            return next(iter(self._waiting))
        total, best = 0, None
        for run_id in self._waiting:
            weight = self._weight.get(run_id, 1)
            credit = self._credit.get(run_id, 0) + weight
            self._credit[run_id] = credit
            total += weight
            if best is None or credit > self._credit[best]:
                best = run_id
        assert best is not None
        self._credit[best] -= total
        return best

    def _forget(self, run_id: str, future: asyncio.Future[None]) -> None:
        queue = self._waiting.get(run_id)
        if queue is None:
            return
        try:
            queue.remove(future)
        except ValueError:
            return
        if not queue:
            self._drop(run_id)

    def _drop(self, run_id: str) -> None:
        """``run_id`` has nothing waiting any more: forget it (a long-lived worker sees many
        runs)."""
        del self._waiting[run_id]
        self._weight.pop(run_id, None)
        self._credit.pop(run_id, None)

    def set_limit(self, limit: int) -> None:
        self.limit = max(1, min(self.bound, limit))
        self.wake()


class _Turn:
    __slots__ = ("gate", "run_id", "taken", "weight")

    def __init__(self, gate: FairGate, run_id: str, weight: int) -> None:
        self.gate, self.run_id, self.weight, self.taken = gate, run_id, weight, 0.0

    async def __aenter__(self) -> None:
        await self.gate.acquire(self.run_id, self.weight)
        self.taken = time.monotonic()

    async def __aexit__(self, *exc_info: object) -> None:
        self.gate._held_for(time.monotonic() - self.taken)


class LimitFinder:
    """Moves a gate's limit, one tick at a time, by how long turns are held and by the
    loop's lag (module docstring)."""

    def __init__(self, gate: FairGate, floor: int = FLOOR) -> None:
        self.gate = gate
        self.floor = min(floor, gate.bound)
        self.slow_start = True
        self.tick = 0
        self._lags: collections.deque[float] = collections.deque(maxlen=LAG_TICKS)
        self._holds: collections.deque[float] = collections.deque(maxlen=BASE_TICKS)
        self.hold_s: float | None = None  # turns' recent hold time (a moving average)
        self._cut_at = -CUT_GAP_TICKS

    @property
    def base_s(self) -> float | None:
        """The shortest hold of the last BASE_TICKS ticks: a turn's time unslowed."""
        return min(self._holds) if self._holds else None

    def step(self, lag_s: float, held_s: float | None) -> None:
        """One tick: ``lag_s`` how late its timer fired, ``held_s`` the mean hold of the
        turns that ended during it (None: none ended)."""
        gate = self.gate
        self.tick += 1
        self._lags.append(lag_s)
        lag = sorted(self._lags)[len(self._lags) // 2]  # the median: one stall is no trend
        if held_s is not None:
            self._holds.append(held_s)
            self.hold_s = held_s if self.hold_s is None else (
                HOLD_WEIGHT * held_s + (1 - HOLD_WEIGHT) * self.hold_s)
        base = self.base_s
        slowed = base is not None and self.hold_s is not None and self.hold_s > SLOWED * base
        if slowed and lag > BUSY_LAG_S:
            assert self.hold_s is not None
            gap = min(CUT_GAP_TICKS, max(1, math.ceil(self.hold_s / TICK_S)))
            if self.tick - self._cut_at >= gap:  # the last cut has had time to show
                self._cut_at = self.tick
                self.slow_start = False
                gate.set_limit(max(self.floor, gate.limit - max(1, gate.limit // 8)))
            return
        if not (gate.waiting and gate.held >= gate.limit):
            return  # no one waits for a turn: nothing to learn by growing
        if max(self._lags) < IDLE_LAG_S:
            # Idle for LAG_TICKS ticks: the turns are not what the process is short of,
            # whatever holds them (items waiting for a limit's turn or a slow vendor: slowed,
            # but not by this process), so turns must not be what others wait for.
            grow = gate.limit if self.slow_start else max(1, gate.limit // 4)
        elif base is not None and self.hold_s is not None and self.hold_s < GROW_BELOW * base:
            grow = gate.limit if self.slow_start else max(1, gate.limit // 16)
        else:
            return
        gate.set_limit(gate.limit + grow)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + TICK_S
            await asyncio.sleep(TICK_S)
            lag = max(0.0, loop.time() - due)
            self.step(lag, self.gate.take_holds())
