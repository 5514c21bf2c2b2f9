"""Outages of Redis, each told once: one line when it starts, one when it is back.

A thread that talks to Redis in a loop (the scheduler's mover, the reaper) logged a traceback
on every try while Redis was down, five a second. ``Outage`` turns all the failed tries of one
outage into two lines, a warning at the first and "... is back after N s" at the first success
after it, and says how long to wait before the next try: longer the longer the outage lasts,
up to a cap (a backoff that needs no state per caller, so threads can share one ``Outage``;
``shared`` gives one per Redis and process, so a worker's threads tell each outage once
between them).

``OncePerOutage`` does the same for lines fanout does not write: a logging filter that lets
the first line of an outage through (its traceback cut to one line) and drops the rest until
a line says the connection is back, or until nothing was said of it for ``quiet_s``. What is
a line "of an outage" is the caller's to say (``workers/app.py`` names Celery's).

``SinkOutageNote`` tells producers that workers cannot write to the sink (the sink gate,
``workers/sinks/gate.py``, keeps its own state per process): a Redis key with a short TTL.

Time comes from ``clock`` (monotonic seconds), so tests move it instead of sleeping.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import redis

from workers import keys

#: What "Redis is unreachable" looks like to redis-py (BusyLoadingError, a server still loading
#: its data, is a ConnectionError).
DOWN_ERRORS: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)

Clock = Callable[[], float]

log = logging.getLogger("fanout.outage")


def describe(exc: BaseException, limit: int = 160) -> str:
    """An exception in one short line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def where(client: redis.Redis) -> str:
    """``redis://host:port/db`` of a client, never its password."""
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}"
    host, port, db = kwargs.get("host", "localhost"), kwargs.get("port", 6379), kwargs.get("db", 0)
    return f"redis://{host}:{port}/{db}"


class Outage:
    """The outages of one dependency. ``failed`` after a failed call, ``ok`` after a good one.

    ``down_line`` may use ``{error}``, ``back_line`` ``{seconds}``; ``say`` tells the first,
    ``say_back`` (default ``say``) the second. ``say`` None says nothing (the state is still
    kept). Thread-safe.
    """

    def __init__(
        self, say: Callable[[str], None] | None, down_line: str, back_line: str, *,
        say_back: Callable[[str], None] | None = None, clock: Clock = time.monotonic,
        first_delay_s: float = 0.25, max_delay_s: float = 2.0,
    ) -> None:
        self.say = say
        self.say_back = say_back or say
        self.down_line = down_line
        self.back_line = back_line
        self.clock = clock
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self._since: float | None = None
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self._since is not None

    def down_for_s(self) -> float:
        """How long the current outage has lasted (0 when there is none)."""
        since = self._since
        return 0.0 if since is None else max(0.0, self.clock() - since)

    def failed(self, exc: BaseException) -> float:
        """Note a failed call; the first of an outage is told. Returns the seconds to wait
        before the next try: a quarter of the outage so far, between the two bounds."""
        with self._lock:
            now = self.clock()
            started = self._since is None
            if self._since is None:
                self._since = now
            lasted = now - self._since
        if started and self.say is not None:
            self.say(self.down_line.format(error=describe(exc)))
        return min(self.max_delay_s, max(self.first_delay_s, lasted / 4))

    def ok(self) -> float | None:
        """Note a good call. Returns how long the outage lasted if this ends one (told)."""
        with self._lock:
            if self._since is None:
                return None
            lasted = max(0.0, self.clock() - self._since)
            self._since = None
        if self.say_back is not None:
            self.say_back(self.back_line.format(seconds=lasted))
        return lasted


_shared: dict[str, Outage] = {}
_shared_lock = threading.Lock()


def shared(client: redis.Redis) -> Outage:
    """This process's ``Outage`` of the Redis behind ``client``, told on the ``fanout.outage``
    logger: every thread of a worker that meets the outage shares it."""
    url = where(client)
    with _shared_lock:
        outage = _shared.get(url)
        if outage is None:
            outage = _shared[url] = Outage(
                log.warning,
                f"Redis at {url} unreachable ({{error}}): retrying until it is back",
                f"Redis at {url} is back after {{seconds:.1f}} s", say_back=log.info,
            )
        return outage


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen = 0
    while exc is not None and seen < 10:
        yield exc
        exc = exc.__cause__ or exc.__context__
        seen += 1


def record_errors(record: logging.LogRecord) -> Iterator[BaseException]:
    """The exceptions a log record carries: its exc_info and its arguments, with their causes."""
    if record.exc_info and record.exc_info[1] is not None:
        yield from _chain(record.exc_info[1])
    if isinstance(record.args, tuple):
        for arg in record.args:
            if isinstance(arg, BaseException):
                yield from _chain(arg)


class OncePerOutage(logging.Filter):
    """Lets through the first log line of each outage and drops the others.

    A line is of an outage when it carries one of ``errors`` (as exc_info or an argument,
    or as their cause) or its template or a text argument holds one of ``phrases``. It ends
    with a line whose template holds one of ``back_phrases`` (let through), or once no line
    of it came for ``quiet_s``. The line let through keeps one line: its traceback is
    replaced by the error's text.
    """

    def __init__(
        self, errors: tuple[type[BaseException], ...], phrases: tuple[str, ...],
        back_phrases: tuple[str, ...], *, clock: Clock = time.monotonic, quiet_s: float = 60.0,
    ) -> None:
        super().__init__()
        self.errors = errors
        self.phrases = phrases
        self.back_phrases = back_phrases
        self.clock = clock
        self.quiet_s = quiet_s
        self.dropped = 0
        self._last: float | None = None  # when the open outage last said something
        self._lock = threading.Lock()

    def of_outage(self, record: logging.LogRecord) -> bool:
        texts = [str(record.msg)]  # the template and its text arguments: no formatting here
        if isinstance(record.args, tuple):
            texts += [arg for arg in record.args if isinstance(arg, str)]
        if any(phrase in text for text in texts for phrase in self.phrases):
            return True
        return any(isinstance(e, self.errors) for e in record_errors(record))

    def filter(self, record: logging.LogRecord) -> bool:
        decided = record.__dict__.get(_DECIDED)
        if decided is not None:  # a record is seen once per handler: one decision for all
            return bool(decided)
        keep = self._decide(record)
        setattr(record, _DECIDED, keep)
        return keep

    def _decide(self, record: logging.LogRecord) -> bool:
        template = str(record.msg)
        if any(p in template for p in self.back_phrases):
            with self._lock:
                self._last = None
            return True
        if not self.of_outage(record):
            return True
        with self._lock:
            now = self.clock()
            first = self._last is None or now - self._last > self.quiet_s
            self._last = now
            if not first:
                self.dropped += 1
        if first:
            _one_line(record, self.errors)
        return first


_DECIDED = "fanout_outage_kept"


def _one_line(record: logging.LogRecord, errors: tuple[type[BaseException], ...]) -> None:
    """The record without its traceback, the outage's error (or the exception) in its text."""
    if not record.exc_info or record.exc_info[1] is None:
        return
    error = record.exc_info[1]
    down = next((e for e in _chain(error) if isinstance(e, errors)), error)
    message = record.getMessage()
    detail = describe(down)
    record.msg = message if detail in message else f"{message} ({detail})"
    record.args = None
    record.exc_info = None
    record.exc_text = None


class SinkOutageNote:
    """``keys.SINK_DOWN`` while this worker cannot write to the sink. ``__call__(error)``
    sets it (refreshing its TTL), ``__call__(None)`` deletes it. A Redis error is let go: the
    note is for producers to tell why a run stands still, the gate does not depend on it."""

    TTL_S = 30  # longer than the gate's longest wait between probes (10 s)

    def __init__(self, client: redis.Redis, worker: str | None = None) -> None:
        self.redis = client
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self._since: float | None = None

    def __call__(self, error: str | None) -> None:
        try:
            if error is None:
                self._since = None
                self.redis.delete(keys.SINK_DOWN)
                return
            self._since = self._since or time.time()
            value = json.dumps({"error": error, "since": self._since, "worker": self.worker})
            self.redis.set(keys.SINK_DOWN, value, ex=self.TTL_S)
        except redis.RedisError as exc:
            log.debug("could not note the sink outage in Redis: %s", exc)

    @staticmethod
    def read(client: redis.Redis) -> str | None:
        """The error a worker last met writing to the sink, while it lasts; else None."""
        raw = client.get(keys.SINK_DOWN)
        if not raw:
            return None
        try:
            return str(json.loads(raw)["error"])
        except (ValueError, KeyError, TypeError):
            return str(raw)
