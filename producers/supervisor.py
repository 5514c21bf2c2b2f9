"""``fanout worker``: Celery worker processes under one supervisor.

Each child runs in its own session with a parent-death signal (``processes.spawn``): a
terminal's Ctrl-C reaches only the supervisor, and the children go down with it whatever kills
it. The supervisor turns SIGINT or SIGTERM into ONE SIGTERM per child (Celery's warm shutdown:
running tasks finish), waits for them and exits 0. A second SIGINT/SIGTERM kills them (SIGKILL:
Celery's cold shutdown, SIGQUIT, cannot stop a thread pool). A child that dies on its own is
started again after 1 s, 2 s, 4 s ... (capped; the count starts over once it stayed up a
while). A child that exits 0 by itself was asked to stop (a remote ``shutdown``, as ``fanout
down`` broadcasts, or a SIGTERM to it alone): it is not started again.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from celery.utils.nodenames import host_format

from producers import processes

FIRST_RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 30.0
#: A child up this long before it died starts the backoff over.
STABLE_AFTER_S = 60.0
_PREFIX = "fanout worker:"


def restart_delay_s(failures_in_a_row: int) -> float:
    """1 s, 2 s, 4 s ... for the 1st, 2nd, 3rd ... death in a row, capped."""
    return min(FIRST_RESTART_DELAY_S * 2 ** (failures_in_a_row - 1), MAX_RESTART_DELAY_S)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Child:
    """One Celery worker process, by its node name (``%h`` expanded, for the log lines)."""

    name: str
    command: list[str]
    process: subprocess.Popen[Any] | None = None
    started_at: float = 0.0
    failures_in_a_row: int = 0
    restart_at: float | None = None


class Supervisor:
    """Runs ``commands`` (node name -> command) until they are all done; see the module.
    A child up ``stable_after_s`` before it died starts its backoff over."""

    def __init__(
        self, commands: Mapping[str, Sequence[str]], env: Mapping[str, str], *,
        say: Callable[[str], None] = _to_stderr, clock: Callable[[], float] = time.monotonic,
        stable_after_s: float = STABLE_AFTER_S,
    ) -> None:
        self.children = [Child(name, list(cmd)) for name, cmd in commands.items()]
        self.env = dict(env)
        self.say = say
        self.clock = clock
        self.stable_after_s = stable_after_s
        self.stopping: int | None = None  # the signal that started the shutdown
        self.escalated = False
        self.failed_in_shutdown = False
        self._signals: list[int] = []

    def run(self) -> int:
        """Start the children and supervise them; 0 after a warm shutdown in which every
        child ended well, else 1."""
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        watched = (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)
        previous = {signum: signal.signal(signum, self._note) for signum in watched}
        old_wakeup = signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        try:
            for child in self.children:
                self._start(child)
            while any(c.process is not None or c.restart_at is not None for c in self.children):
                self._sleep(wake_read)
                self._handle_signals()
                self._reap()
                self._restart_due()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            wake_read.close()
            wake_write.close()
        return 1 if self.failed_in_shutdown else 0

    def _note(self, signum: int, _frame: FrameType | None) -> None:
        self._signals.append(signum)  # handled in the loop, not in the handler

    def _sleep(self, wake_read: socket.socket) -> None:
        """Until a signal arrives (a child's SIGCHLD included) or a restart is due."""
        due = [c.restart_at for c in self.children if c.restart_at is not None]
        timeout_s = max(0.0, min(due) - self.clock()) if due else None
        if not self._signals:
            select.select([wake_read], [], [], timeout_s)
        try:
            while wake_read.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _start(self, child: Child) -> None:
        child.process = processes.spawn(child.command, self.env)
        child.started_at = self.clock()
        child.restart_at = None

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum != signal.SIGCHLD:
                self._stop(signum)

    def _alive(self) -> list[subprocess.Popen[Any]]:
        return [c.process for c in self.children if c.process and c.process.poll() is None]

    def _stop(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stopping is None:
            self.stopping = signum
            alive = self._alive()
            for child in self.children:
                child.restart_at = None
            self.say(f"{_PREFIX} {name}: warm shutdown of {len(alive)} worker processes (they "
                     f"finish their tasks; {name} again stops them at once)")
            for process in alive:
                process.send_signal(signal.SIGTERM)
        elif not self.escalated:
            self.escalated = True
            self.say(f"{_PREFIX} second {name}: killing the worker processes (SIGKILL); the "
                     "messages they had not finished come back after the visibility timeout")
            for process in self._alive():
                processes.kill_group(process)

    def _reap(self) -> None:
        for child in self.children:
            if child.process is not None and child.process.poll() is not None:
                self._ended(child, child.process)

    def _ended(self, child: Child, process: subprocess.Popen[Any]) -> None:
        code, up_s = process.returncode, self.clock() - child.started_at
        child.process = None
        what = f"{_PREFIX} {child.name} (pid {process.pid})"
        if self.stopping is not None:
            if code != 0:
                self.failed_in_shutdown = True
                self.say(f"{what} ended in the shutdown: {describe_exit(code)}")
            return
        if code == 0:
            self.say(f"{what} shut down (exit code 0: it was asked to): not restarted")
            return
        stable = up_s >= self.stable_after_s
        child.failures_in_a_row = 1 if stable else child.failures_in_a_row + 1
        delay_s = restart_delay_s(child.failures_in_a_row)
        child.restart_at = self.clock() + delay_s
        self.say(f"{what} died ({describe_exit(code)}) after {up_s:.0f} s up; restarting it "
                 f"in {delay_s:g} s")

    def _restart_due(self) -> None:
        now = self.clock()
        for child in self.children:
            if child.restart_at is not None and child.restart_at <= now:
                self._start(child)


def supervise_workers(count: int, env: Mapping[str, str], options: Mapping[str, Any]) -> int:
    """Run ``count`` Celery worker processes in the foreground, named ``fanout{i}-{pid}@%h``
    (unique on the host); returns the supervisor's exit code."""
    commands = {}
    for i in range(1, count + 1):
        name = f"fanout{i}-{os.getpid()}@%h"
        commands[host_format(name)] = processes.worker_command(name=name, **options)
    return Supervisor(commands, env).run()
