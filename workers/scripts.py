"""The Lua scripts, loaded from ``lua/`` once per Redis client and called with named keys.

Each script's header states its KEYS (by name, in order) and ARGV. A ``Script`` takes the key
names from that header, so a caller passes a ``RunKeys`` (or a dict) and never a position.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis

# "-- KEYS: a, b," goes on in an indented line "--       c, d" after a trailing comma.
_KEYS_HEADER = re.compile(r"^-- KEYS: ((?:.*,\n-- {2,})*.+)$", re.MULTILINE)


@dataclass(frozen=True)
class Script:
    name: str
    keys: tuple[str, ...]
    source: str

    def __call__(
        self, client: redis.Redis, keys: Any, args: Sequence[Any], *, pipe: Any = None
    ) -> Any:
        """Run on ``client`` (or queue on ``pipe``). ``keys``: an object or mapping with an
        attribute or entry for each of the script's key names."""
        named = [_lookup(keys, k) for k in self.keys]
        return _registered(client, self.name)(keys=named, args=list(args), client=pipe)


def _lookup(keys: Any, name: str) -> str:
    return str(keys[name] if isinstance(keys, Mapping) else getattr(keys, name))


_INCLUDE_LINE = re.compile(r"^-- INCLUDE: (\w+)$", re.MULTILINE)


def _source(name: str) -> str:
    return resources.files("workers").joinpath("lua", f"{name}.lua").read_text()


@functools.cache
def load(name: str) -> Script:
    """The script ``lua/NAME.lua``, with each "-- INCLUDE: _snippet" line replaced by
    ``lua/_snippet.lua`` (Lua scripts sent to Redis share no code otherwise)."""
    source = _INCLUDE_LINE.sub(lambda m: _source(m.group(1)).rstrip("\n"), _source(name))
    match = _KEYS_HEADER.search(source)
    if match is None:
        raise ValueError(f"lua/{name}.lua has no '-- KEYS: name, name' header")
    names = match.group(1).replace("\n--", " ").split(",")
    return Script(name, tuple(k.strip() for k in names), source)


@functools.cache
def _registered(client: redis.Redis, name: str) -> Any:
    return client.register_script(load(name).source)
