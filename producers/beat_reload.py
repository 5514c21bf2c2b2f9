"""What ``fanout beat`` reads again without a restart: its config file (``BeatConfig``), on
SIGHUP (``ReloadSignal``) or on an edit, and the one line that says what a reload changed
(``describe_changes``). The scheduler that uses them is ``beat.py``."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from producers.config_file import RunDefaults, parse_limits, parse_run_defaults, read_config
from producers.scheduling import Schedule, parse_config
from workers.limits import LimitConfig
from workers.stage_config import apply_stage_settings, stage_tables


@dataclass(frozen=True)
class BeatConfig:
    """What a beat took from the config file: the schedules it runs and the run defaults of
    their pipelines; the limits and stage settings, to say when they change."""

    source: str = ""
    schedules: tuple[Schedule, ...] = ()
    run_defaults: Mapping[str, RunDefaults] = field(default_factory=dict)
    limits: Mapping[str, LimitConfig] = field(default_factory=dict)
    stages: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def load_beat_config() -> BeatConfig:
    """The config file, every section checked, its stage settings applied to this process's
    pipelines last (a bad file: ConfigError, and nothing applied)."""
    data, path = read_config()
    source = path or "config"
    base = Path(path).parent if path else Path()  # where a schedule's items_file is
    config = BeatConfig(source, tuple(parse_config(data, source, base)),
                        parse_run_defaults(data, source),
                        {limit.name: limit for limit in parse_limits(data, source)},
                        stage_tables(data, source))
    apply_stage_settings(data, source)
    return config


def describe_changes(old: BeatConfig, new: BeatConfig) -> str:
    """What a reload changed, in one line: schedules by name, then the names of the limits,
    stage settings and run defaults that differ."""
    before = {s.name: s for s in old.schedules}
    after = {s.name: s for s in new.schedules}
    schedules = [
        f"{what}: {', '.join(sorted(names))}"
        for what, names in (
            ("added", after.keys() - before.keys()),
            ("removed", before.keys() - after.keys()),
            ("changed", {n for n in before.keys() & after.keys() if before[n] != after[n]}),
        ) if names
    ]
    parts = [f"schedules {', '.join(schedules)}"] if schedules else []
    for what, names, note in (
        ("limits", _changed(old.limits, new.limits),
         " (the beat does not apply them: fanout limits apply)"),
        ("stage settings", _changed(old.stages, new.stages),
         " (workers take them when restarted)"),
        ("run defaults", _changed(old.run_defaults, new.run_defaults), ""),
    ):
        if names:
            parts.append(f"{what} changed: {', '.join(names)}{note}")
    return "; ".join(parts) or "nothing changed"


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))


class ReloadSignal:
    """SIGHUP asks the beat to read its config file again at once. A signal handler may run
    between any two steps of the main thread, so it only notes the request and writes to a
    pipe, which wakes the beat's wait (``wait``)."""

    def __init__(self) -> None:
        self.pending = False
        self._pipe: tuple[int, int] | None = None

    def install(self) -> None:
        """Handle SIGHUP from now on (the main thread only may install a handler)."""
        if threading.current_thread() is not threading.main_thread():
            return
        if self._pipe is None:
            self._pipe = os.pipe()
            for fd in self._pipe:
                os.set_blocking(fd, False)
        signal.signal(signal.SIGHUP, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True
        if self._pipe is not None:
            with contextlib.suppress(OSError):  # full: a wake-up is there already
                os.write(self._pipe[1], b"\0")

    def take(self) -> bool:
        """Whether a reload was asked for since the last call."""
        pending, self.pending = self.pending, False
        return pending

    def wait(self, timeout_s: float) -> None:
        """Sleep up to ``timeout_s``; a SIGHUP ends it at once."""
        if self.pending:
            return
        if self._pipe is None:
            time.sleep(timeout_s)
            return
        ready, _, _ = select.select([self._pipe[0]], [], [], timeout_s)
        if ready:
            with contextlib.suppress(OSError):
                os.read(self._pipe[0], 64)


#: The process's one SIGHUP handler (installed by the scheduler that runs).
RELOAD = ReloadSignal()
