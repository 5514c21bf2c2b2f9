"""The sink gate: writes of a process wait here through an outage of the sink.

A write that meets ``SinkDown`` does not fail its items and does not send their messages
straight back (that was a hot loop: every worker thread requeueing the same messages as fast
as it could). It waits at the gate instead, its records in memory: one waiting thread probes
the sink, 0.5 s after the first failure then twice as long after each failed probe (up to
10 s), the others sleep until it is back; then each writes again. A write that waited
``max_wait_s`` (or any, once the worker shuts down) gives up with ``SinkDown``, and its caller
gives its messages back, as before, once a minute instead of thousands of times.

The outage is told once: ``say_down`` at its start, ``say_back`` at its end with how long it
lasted; ``note`` is told the error at the start and at each failed probe, and None at the end
(the worker records it in Redis, ``workers/outage.py: SinkOutageNote``, for producers).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from workers.outage import describe
from workers.sinks.base import SinkDown

T = TypeVar("T")
Say = Callable[[str], None]
Note = Callable[[str | None], None]


def _quiet(_: object) -> None:
    return None


class SinkGate:
    """One per process (``sink_gate``); thread-safe."""

    def __init__(
        self, *, say_down: Say = _quiet, say_back: Say = _quiet, note: Note = _quiet,
        clock: Callable[[], float] = time.monotonic, first_delay_s: float = 0.5,
        max_delay_s: float = 10.0, max_wait_s: float = 60.0,
    ) -> None:
        self.say_down, self.say_back, self.note = say_down, say_back, note
        self.clock = clock
        self.first_delay_s, self.max_delay_s = first_delay_s, max_delay_s
        self.max_wait_s = max_wait_s
        self._cond = threading.Condition()
        self._since: float | None = None  # when the current outage started
        self._error = ""
        self._delay_s = first_delay_s
        self._probing = False
        self._back_at = float("-inf")  # when the last outage ended
        self._stopping = threading.Event()

    @property
    def down(self) -> bool:
        return self._since is not None

    def write(self, attempt: Callable[[], T], probe: Callable[[], None]) -> T:
        """``attempt()``, again after each outage it meets, until it returns (its result) or
        the gate gives up (``SinkDown``). ``probe`` raises SinkDown while the sink is down."""
        deadline = self.clock() + self.max_wait_s
        while True:
            self._wait_until_up(probe, deadline)
            began = self.clock()
            try:
                result = attempt()
            except SinkDown as exc:
                if began < self._back_at:
                    continue  # it met what the outage that ended broke: try again, told once
                self.went_down(exc)
                continue
            self._came_back(began)
            return result

    def went_down(self, exc: BaseException) -> None:
        """Note a failed write or open of the sink; the first of an outage is told."""
        error = describe(exc, limit=300)
        with self._cond:
            started = self._since is None
            if started:
                self._since, self._delay_s = self.clock(), self.first_delay_s
            self._error = error
        if started:
            self.say_down(error)
            self.note(error)

    def stop(self) -> None:
        """The worker is shutting down: every write waiting at the gate gives up now."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()

    def _wait_until_up(self, probe: Callable[[], None], deadline: float) -> None:
        with self._cond:
            while True:
                if self._since is None:
                    return
                self._give_up_if_due(deadline)
                if not self._probing:
                    self._probing = True
                    break
                self._cond.wait(min(1.0, max(0.0, deadline - self.clock())))
        try:
            self._probe_until_up(probe, deadline)
        finally:
            with self._cond:
                self._probing = False
                self._cond.notify_all()  # the others wake: it is back, or one probes next

    def _probe_until_up(self, probe: Callable[[], None], deadline: float) -> None:
        while True:
            wait_s = min(self._delay_s, max(0.0, deadline - self.clock()))
            self._stopping.wait(wait_s)  # sleeps: no CPU while the sink is down
            with self._cond:
                self._give_up_if_due(deadline)
            try:
                probe()
            except SinkDown as exc:
                self._error = describe(exc, limit=300)
                self._delay_s = min(self.max_delay_s, self._delay_s * 2)
                self.note(self._error)  # refreshed while the outage lasts
                continue
            self._came_back()
            return

    def _give_up_if_due(self, deadline: float) -> None:
        """Called holding the lock, while the sink is down."""
        if self._stopping.is_set() or self.clock() >= deadline:
            waited = "the worker is shutting down" if self._stopping.is_set() \
                else f"waited {self.max_wait_s:g} s"
            raise SinkDown(f"{self._error} ({waited}: the messages go back)")

    def _came_back(self, began: float | None = None) -> None:
        """The sink answered. A write that ``began`` before the outage was told (it was under
        way when another write failed) does not end it: only what was tried since can say
        the sink is back, or a cut would be told twice, gone, back and gone again. For the
        same reason a write begun before the sink came back, that then fails (on a connection
        the outage broke), is tried again without telling a new outage (``write``)."""
        with self._cond:
            since = self._since
            if since is not None and began is not None and began < since:
                return
            self._since = None
            if since is not None:
                self._back_at = self.clock()
            self._cond.notify_all()
        if since is not None:
            self.say_back(f"{max(0.0, self.clock() - since):.1f}")
            self.note(None)


_gates: dict[int, SinkGate] = {}
_gates_lock = threading.Lock()


def sink_gate(make: Callable[[], SinkGate]) -> SinkGate:
    """This process's gate, made by ``make`` the first time (a forked child makes its own,
    so a parent's waiting threads, which it does not have, are never waited for)."""
    pid = os.getpid()
    with _gates_lock:
        gate = _gates.get(pid)
        if gate is None:
            gate = _gates[pid] = make()
        return gate
