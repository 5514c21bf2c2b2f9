"""Sinks by URL: ``sqlite:///path`` (default) or ``postgresql://...``."""

from __future__ import annotations

import functools
import os

from workers.settings import ConfigError, get_settings
from workers.sinks.base import NATURAL_KEY, Record, Sink

__all__ = ["NATURAL_KEY", "Record", "Sink", "get_sink", "open_sink"]


def open_sink(url: str) -> Sink:
    if url.startswith("sqlite:///"):
        from workers.sinks.sqlite import SqliteSink

        return SqliteSink(url.removeprefix("sqlite:///"))
    raise ConfigError(f"unsupported FANOUT_SINK_URL {url!r} (expected sqlite:///PATH)")


@functools.cache
def _sink_for(url: str, pid: int) -> Sink:
    return open_sink(url)


def get_sink() -> Sink:
    """This process's sink (a forked worker child opens its own connection)."""
    return _sink_for(get_settings().sink_url, os.getpid())
