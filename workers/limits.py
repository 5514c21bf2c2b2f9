"""Global rate and concurrency limits, shared by every worker on every host (DESIGN 4.5).

A named limit is configuration, managed like ``prefect gcl``: a rate with a burst
(``Rate.parse("60/h")``, GCRA), a number of concurrency slots, or both. The decisions are Lua
scripts on Redis server time (``lua/limit_*.lua``): no client clock, no check-then-set, no
WATCH. A vendor's 429 pushes the limit back for everyone (``push_back``); slots are leases that
expire, so a worker killed while holding one cannot leak it beyond its lease.

``try_acquire`` and ``acquire_slot`` read the limit's configuration (one round trip) before
their script (another), so a ``fanout limits set`` takes effect at once everywhere.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple

import redis
from redis.commands.core import Script

from workers.policy.gcra import Rate

log = logging.getLogger("fanout.limits")

# --- Redis keys of limits (to move into workers/keys.py) ---------------------------------------
# Configuration, without a TTL:
# - ``fanout:limits``                set: the names of all limits (``list_limits``)
# - ``fanout:limit:{NAME}``          hash: ``rate`` ("60/h"), ``burst``, ``concurrency``; a field
#                                    is absent when the limit has no such part
# State, each expiring about a second after it stops mattering:
# - ``fanout:limit:{NAME}:tat``      string: GCRA theoretical arrival time (epoch s, server time);
#                                    expires once it has passed (then it means "idle")
# - ``fanout:limit:{NAME}:backoff``  string: nothing passes before this time (epoch s); expires
#                                    when it has passed
# - ``fanout:limit:{NAME}:slots``    sorted set: holder id -> lease expiry (epoch s); expires
#                                    when its longest lease has
# NAME is a hash tag, so one limit's keys share a Redis Cluster slot (limit_gcra.lua reads two).
LIMITS_INDEX = "fanout:limits"


@dataclass(frozen=True, slots=True)
class LimitKeys:
    """The keys of one limit, named as the scripts' ``-- KEYS:`` headers name them."""

    config: str
    tat: str
    backoff: str
    slots: str

    @classmethod
    def of(cls, name: str) -> LimitKeys:
        base = f"fanout:limit:{{{check_name(name)}}}"
        return cls(config=base, tat=f"{base}:tat", backoff=f"{base}:backoff",
                   slots=f"{base}:slots")
# -----------------------------------------------------------------------------------------------

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


def check_name(name: str) -> str:
    if not (isinstance(name, str) and _NAME.fullmatch(name)):
        raise ValueError(
            f"bad limit name {name!r}: use lowercase letters, digits, '_', '.' and '-', "
            "starting with a letter or digit (e.g. 'github-api')"
        )
    return name


class UnknownLimit(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no limit named {name!r} (create it with set_limit / fanout limits set)")
        self.name = name


class SlotUnavailable(Exception):
    """Every concurrency slot of the limit is taken."""

    def __init__(self, name: str) -> None:
        super().__init__(f"every concurrency slot of limit {name!r} is taken")
        self.name = name


@dataclass(frozen=True)
class LimitConfig:
    name: str
    rate: Rate | None = None
    burst: int = 1
    concurrency: int | None = None


class Permit(NamedTuple):
    allowed: bool
    wait_s: float  # 0 when allowed; otherwise how long until a request could pass


# --- scripts: registered once per client -------------------------------------------------------
@dataclass(frozen=True)
class _Scripts:
    gcra: Script
    backoff: Script
    slot_acquire: Script
    slot_renew: Script


@functools.cache
def _source(name: str) -> str:
    return resources.files("workers").joinpath("lua", f"{name}.lua").read_text()


# Weak, so a client that is dropped takes its scripts with it. Two threads racing here register
# a script twice, which is harmless: registering is local (the SHA), not a round trip.
_REGISTERED: weakref.WeakKeyDictionary[redis.Redis, _Scripts] = weakref.WeakKeyDictionary()


def _scripts(client: redis.Redis) -> _Scripts:
    found = _REGISTERED.get(client)
    if found is None:
        found = _REGISTERED[client] = _Scripts(*(
            client.register_script(_source(f"limit_{name}"))
            for name in ("gcra", "backoff", "slot_acquire", "slot_renew")
        ))
    return found
# -----------------------------------------------------------------------------------------------


class Limits:
    """Named global limits in one Redis. Cheap to make; thread-safe like the client."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._scripts = _scripts(client)

    # --- configuration ---
    def set_limit(
        self,
        name: str,
        rate: str | Rate | None = None,
        burst: int | None = None,
        concurrency: int | None = None,
    ) -> LimitConfig:
        """Create or replace a limit: afterwards it has exactly the parts given."""
        config = _config(name, rate, burst, concurrency)
        fields: list[str | int] = []
        if config.rate is not None:
            fields += ["rate", str(config.rate), "burst", config.burst]
        if config.concurrency is not None:
            fields += ["concurrency", config.concurrency]
        keys = LimitKeys.of(name)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(keys.config)
        pipe.hset(keys.config, items=fields)
        pipe.sadd(LIMITS_INDEX, name)
        pipe.execute()
        return config

    def get(self, name: str) -> LimitConfig | None:
        return _parse_config(name, self.redis.hgetall(LimitKeys.of(name).config))

    def list_limits(self) -> list[LimitConfig]:
        names = sorted(_text(n) for n in self.redis.smembers(LIMITS_INDEX))
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(LimitKeys.of(name).config)
        found = (_parse_config(n, f) for n, f in zip(names, pipe.execute(), strict=True))
        return [config for config in found if config is not None]

    def delete_limit(self, name: str) -> bool:
        """Remove a limit's configuration and state. False when there was no such limit."""
        keys = LimitKeys.of(name)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(keys.config)
        pipe.delete(keys.tat, keys.backoff, keys.slots)
        pipe.srem(LIMITS_INDEX, name)
        return bool(pipe.execute()[0])

    # --- rate and push-back ---
    def try_acquire(self, name: str, cost: int = 1) -> Permit:
        """Take ``cost`` from the limit's rate now, or learn how long to wait. A limit without
        a rate only refuses while it is pushed back."""
        if not _positive_int(cost):
            raise ValueError(f"cost must be a whole number >= 1, got {cost!r}")
        config = self._config(name)
        if config.rate is not None and cost > config.burst:
            raise ValueError(f"cost {cost} exceeds the burst {config.burst} of limit {name!r}: "
                             "it could never pass")
        interval_s = config.rate.emission_interval_s if config.rate else 0.0
        keys = LimitKeys.of(name)
        allowed, wait_s = self._scripts.gcra(
            keys=[keys.tat, keys.backoff], args=[interval_s, config.burst, cost]
        )
        return Permit(bool(int(allowed)), float(wait_s))

    def acquire(
        self,
        name: str,
        *,
        max_wait_s: float,
        cost: int = 1,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> Permit:
        """Take from the rate, sleeping through waits while they add up to at most
        ``max_wait_s``; a longer wait is returned instead (the caller re-enqueues the work)."""
        waited_s = 0.0
        while True:
            permit = self.try_acquire(name, cost)
            if permit.allowed or waited_s + permit.wait_s > max_wait_s:
                return permit
            sleep(permit.wait_s)
            waited_s += permit.wait_s

    def push_back(self, name: str, until_s_from_now: float) -> float:
        """Let nothing through the limit for ``until_s_from_now`` (a vendor's Retry-After), for
        every worker. A shorter push-back never shortens one in force. Returns the seconds until
        the limit opens again."""
        if not (isinstance(until_s_from_now, int | float) and math.isfinite(until_s_from_now)
                and until_s_from_now >= 0):
            raise ValueError(f"until_s_from_now must be seconds >= 0, got {until_s_from_now!r}")
        keys = LimitKeys.of(name)
        return float(self._scripts.backoff(keys=[keys.backoff], args=[until_s_from_now]))

    # --- concurrency ---
    def acquire_slot(self, name: str, holder_id: str, lease_s: float) -> bool:
        """Take a slot for ``holder_id`` until ``lease_s`` from now; False when all are taken."""
        config = self._config(name)
        if config.concurrency is None:
            raise ValueError(f"limit {name!r} has no concurrency slots")
        _check_lease(holder_id, lease_s)
        keys = LimitKeys.of(name)
        args: list[str | float] = [holder_id, lease_s, config.concurrency]
        return bool(int(self._scripts.slot_acquire(keys=[keys.slots], args=args)))

    def renew_slot(self, name: str, holder_id: str, lease_s: float) -> bool:
        """Extend a live lease to ``lease_s`` from now; False when it has expired (or was never
        taken): the holder no longer has a slot."""
        _check_lease(holder_id, lease_s)
        keys = LimitKeys.of(name)
        return bool(int(self._scripts.slot_renew(keys=[keys.slots], args=[holder_id, lease_s])))

    def release_slot(self, name: str, holder_id: str) -> bool:
        """Give the slot back; False when the holder had none (its lease had expired)."""
        return bool(self.redis.zrem(LimitKeys.of(name).slots, holder_id))

    @contextmanager
    def slot(self, name: str, holder_id: str, lease_s: float) -> Iterator[Lease]:
        """Hold a slot while the body runs: renewed in a background thread every third of
        ``lease_s``, released on every exit. Raises SlotUnavailable when all are taken."""
        if not self.acquire_slot(name, holder_id, lease_s):
            raise SlotUnavailable(name)
        lease = Lease(name, holder_id, lease_s, self.renew_slot)
        try:
            yield lease
        finally:
            lease.stop()
            try:
                self.release_slot(name, holder_id)
            except redis.RedisError as exc:
                # The lease ends by itself; failing the body's work over it would be worse.
                log.warning("could not release slot of limit %s for %s (its lease will "
                            "expire): %s", name, holder_id, exc)

    def _config(self, name: str) -> LimitConfig:
        config = self.get(name)
        if config is None:
            raise UnknownLimit(name)
        return config


class Lease:
    """A held slot, renewed by a daemon thread until ``stop``. ``lost`` turns true when a
    renewal found the lease expired (the process stalled longer than ``lease_s``)."""

    def __init__(
        self, name: str, holder_id: str, lease_s: float,
        renew: Callable[[str, str, float], bool],
    ) -> None:
        self.name, self.holder_id, self.lease_s = name, holder_id, lease_s
        self._renew = renew
        self._stopped = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-{name}-{holder_id}", daemon=True
        )
        self._thread.start()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self.lease_s / 3):
            try:
                if not self._renew(self.name, self.holder_id, self.lease_s):
                    self._lost.set()
                    log.warning("lease of %s on limit %s expired before it was renewed",
                                self.holder_id, self.name)
                    return
            except redis.RedisError as exc:  # try again next tick: the lease may still be live
                log.warning("renewing lease of %s on limit %s failed: %s",
                            self.holder_id, self.name, exc)


def _config(
    name: str, rate: str | Rate | None, burst: int | None, concurrency: int | None
) -> LimitConfig:
    check_name(name)
    parsed = Rate.parse(rate) if isinstance(rate, str) else rate
    if parsed is not None and not isinstance(parsed, Rate):
        raise ValueError(f"limit {name!r}: rate must be text like '60/h' or a Rate, got {rate!r}")
    if parsed is None and concurrency is None:
        raise ValueError(f"limit {name!r} needs a rate, a concurrency, or both")
    if burst is not None and parsed is None:
        raise ValueError(f"limit {name!r}: a burst needs a rate")
    if burst is not None and not _positive_int(burst):
        raise ValueError(f"limit {name!r}: burst must be a whole number >= 1, got {burst!r}")
    if concurrency is not None and not _positive_int(concurrency):
        raise ValueError(
            f"limit {name!r}: concurrency must be a whole number >= 1, got {concurrency!r}"
        )
    return LimitConfig(name, parsed, burst or 1, concurrency)


def _parse_config(name: str, fields: dict[Any, Any]) -> LimitConfig | None:
    if not fields:
        return None
    text = {_text(k): _text(v) for k, v in fields.items()}
    return LimitConfig(
        name,
        Rate.parse(text["rate"]) if "rate" in text else None,
        int(text.get("burst", 1)),
        int(text["concurrency"]) if "concurrency" in text else None,
    )


def _check_lease(holder_id: str, lease_s: float) -> None:
    if not (isinstance(holder_id, str) and holder_id):
        raise ValueError(f"holder_id must be a non-empty string, got {holder_id!r}")
    if not (isinstance(lease_s, int | float) and math.isfinite(lease_s) and lease_s > 0):
        raise ValueError(f"lease_s must be seconds > 0, got {lease_s!r}")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
