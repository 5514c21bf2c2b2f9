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

import asyncio
import logging
import math
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis
import redis.asyncio as aioredis

from workers import scripts
from workers.keys import LIMITS_INDEX, LimitKeys
from workers.policy import aimd
from workers.policy.gcra import Rate

log = logging.getLogger("fanout.limits")


_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


def check_name(name: str) -> str:
    if not (isinstance(name, str) and _NAME.fullmatch(name)):
        raise ValueError(
            f"bad limit name {name!r}: use lowercase letters, digits, '_', '.' and '-', "
            "starting with a letter or digit (e.g. 'github-api')"
        )
    return name


#: A limit as a call names it: its name, or (name, key) for one key of a limit used per key.
LimitRef = str | tuple[str, str | int]
#: The longest key (an account id, a token's id): it is part of Redis key names.
MAX_KEY_CHARS = 200
#: A key of a limit used per key stays in use (listed, its state kept) this long after its
#: last call; then its state expires and it leaves the index, so keys never pile up.
KEY_IDLE_S = 600.0


def resolve(ref: LimitRef) -> tuple[str, str | None]:
    """(name, key) of a limit reference, checked: ValueError with the reason."""
    if isinstance(ref, str):
        return check_name(ref), None
    if isinstance(ref, tuple) and len(ref) == 2:
        return check_name(ref[0]), check_key(ref[0], ref[1])
    raise ValueError(f"a limit is a name or (name, key), got {ref!r}")


def check_key(name: str, key: object) -> str:
    """A key of limit ``name`` as text: text or a whole number, not empty, not too long."""
    if isinstance(key, bool) or not isinstance(key, str | int):
        raise ValueError(f"limit {name!r}: a key must be text or a whole number, got {key!r}")
    text = str(key)
    if not text:
        raise ValueError(f"limit {name!r}: a key must not be empty")
    if len(text) > MAX_KEY_CHARS:
        raise ValueError(f"limit {name!r}: a key must be at most {MAX_KEY_CHARS} characters, "
                         f"got {len(text)}")
    return text


def label(ref: LimitRef) -> str:
    """How messages name a limit: ``vendor-token`` or ``vendor-token[acct-1]``."""
    name, key = resolve(ref)
    return name if key is None else f"{name}[{key}]"


def _keys(ref: LimitRef) -> LimitKeys:
    return LimitKeys.of(*resolve(ref))


def _key_args(ref: LimitRef) -> list[Any]:
    """The scripts' last two ARGV: the key ('' when not per key) and how long it stays in use."""
    return [resolve(ref)[1] or "", KEY_IDLE_S]


@dataclass(frozen=True)
class PerKey:
    """A stage's limit used per key: each item goes through ``(name, key_of(item))``."""

    name: str
    key_of: Callable[[Any], str | int]

    def ref(self, item: Any) -> LimitRef:
        return (self.name, check_key(self.name, self.key_of(item)))


def per_key(name: str, key_of: Callable[[Any], str | int]) -> PerKey:
    """``@flow.stage(..., limits=[per_key("vendor-token", lambda item: item["token"])])``: each
    key gets its own rate, push-back and slots from the limit ``name`` (its template), created
    on first use and expiring when idle."""
    if not callable(key_of):
        raise ValueError(f"per_key({name!r}, ...): the key must be a function of the item, "
                         f"got {key_of!r}")
    return PerKey(check_name(name), key_of)


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
class AutoRate:
    """``rate = "auto"``: the rate is found by AIMD (``policy/aimd.py``) between these."""

    floor: Rate
    ceiling: Rate

    def aimd_args(self) -> list[float]:
        """``lua/_limit_aimd.lua``'s parameters (P), in its order."""
        return [aimd.START_RATE, 1 / self.floor.emission_interval_s,
                1 / self.ceiling.emission_interval_s, aimd.SLOW_START_GAIN, aimd.STEP,
                aimd.SLOW_START_CUT, aimd.CUT, aimd.CUT_WINDOW_S, KEY_IDLE_S]

    @property
    def start_rate(self) -> float:
        return aimd.start(1 / self.floor.emission_interval_s,
                          1 / self.ceiling.emission_interval_s).rate


@dataclass(frozen=True)
class LimitConfig:
    name: str
    rate: Rate | None = None
    burst: int = 1
    concurrency: int | None = None
    auto: AutoRate | None = None  # rate = "auto" (then ``rate`` is None)

    @property
    def has_rate(self) -> bool:
        return self.rate is not None or self.auto is not None

    def describe_rate(self) -> str | None:
        if self.auto is not None:
            return "auto"
        return str(self.rate) if self.rate is not None else None


#: The async send check (``lua/limit_send.lua``) spaces calls at least this many intervals of
#: the rate apart. A vendor counting R calls in any second sees at most (1 + D) / gap + 1 of
#: them when the calls go out up to D late after their check: with a gap of 1.04 / R that is
#: R while D <= 1.04 (R - 1) / R - 1, about 30 ms at R = 100. Turns are handed out 1.05
#: intervals apart (HEADROOM, throttle.py), so the check rarely holds an on-time call, and has
#: a little room to catch up after a late one.
SEND_GAP = 1.04
#: The same for an auto limit, whose turns are one interval apart (no headroom): spaced like
#: them, and 1% closer, so the check does not hold back calls that come on time.
AUTO_SEND_GAP = 0.99
#: An answer of the send check that reached the loop more than this after Redis gave it is not
#: used (the loop was busy: the engine's Redis calls run on it, and other processes share the
#: cores): the call asks again. 25 of the 30 ms above; the rest for the way to the vendor.
LATE_S = 0.025
#: A call of a fixed rate that finds the send check's gap not over by at most this reserves
#: the moment it ends and goes then, without asking again (lua/limit_send.lua); a longer wait
#: asks again after it, so it learns of a push-back that began meanwhile.
RESERVE_S = 0.05
#: A call that slept until its reserved moment and woke later than this does not go (it gives
#: the moment back if it is still the last, and asks again): of the ~30 ms a late send may take
#: (SEND_GAP) this leaves 20 for the way from the loop to the vendor. At 25 ms a loaded run saw
#: 101 calls in one second at a 100/s limit.
WOKE_LATE_S = 0.010
#: How long a mark given back (lua/limit_unsend.lua) is kept: longer than any gap; an old mark
#: holds nothing back (the next pass is due at mark + gap).
_SENT_TTL_MS = 60_000


class Permit(NamedTuple):
    allowed: bool
    wait_s: float  # 0 when allowed; otherwise how long until a request could pass




class Limits:
    """Named global limits in one Redis. Cheap to make; thread-safe like the client."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._gcra = scripts.load("limit_gcra")
        self._backoff = scripts.load("limit_backoff")
        self._slot_acquire = scripts.load("limit_slot_acquire")
        self._slot_renew = scripts.load("limit_slot_renew")
        self._send = scripts.load("limit_send")
        self._unsend = scripts.load("limit_unsend")
        # Per event loop: its asyncio client (``acquire_async`` and the other ``*_async``).
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopRedis | None] \
            = weakref.WeakKeyDictionary()
        self.late_turns = 0  # send checks ``acquire_async`` did not use (answered late)

    # --- configuration ---
    def set_limit(
        self,
        name: str,
        rate: str | Rate | None = None,
        burst: int | None = None,
        concurrency: int | None = None,
        *,
        ceiling: str | Rate | None = None,
        floor: str | Rate | None = None,
    ) -> LimitConfig:
        """Create or replace a limit: afterwards it has exactly the parts given. ``rate="auto"``
        finds the vendor's limit by itself (AIMD, ``policy/aimd.py``), between ``floor`` and
        ``ceiling``; a rate found so far starts again."""
        config = make_config(name, rate, burst, concurrency, ceiling=ceiling, floor=floor)
        fields: list[str | int] = []
        if config.has_rate:
            fields += ["rate", str(config.describe_rate()), "burst", config.burst]
        if config.auto is not None:
            fields += ["floor", str(config.auto.floor), "ceiling", str(config.auto.ceiling)]
        if config.concurrency is not None:
            fields += ["concurrency", config.concurrency]
        keys = _keys(name)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(keys.config, keys.aimd)
        pipe.hset(keys.config, items=fields)
        pipe.sadd(LIMITS_INDEX, name)
        pipe.execute()
        return config

    def get(self, name: str) -> LimitConfig | None:
        return _parse_config(name, self.redis.hgetall(_keys(name).config))

    def list_limits(self) -> list[LimitConfig]:
        names = sorted(_text(n) for n in self.redis.smembers(LIMITS_INDEX))
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(_keys(name).config)
        found = (_parse_config(n, f) for n, f in zip(names, pipe.execute(), strict=True))
        return [config for config in found if config is not None]

    def delete_limit(self, name: str) -> bool:
        """Remove a limit's configuration and state. False when there was no such limit."""
        keys = _keys(name)
        in_use = [_text(k) for k in self.redis.zrange(keys.keys, 0, -1)]  # type: ignore[arg-type]
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(keys.config)
        for each in [keys, *(LimitKeys.of(name, k) for k in in_use)]:
            pipe.delete(each.tat, each.backoff, each.slots, each.sent, each.aimd)
        pipe.delete(keys.keys)
        pipe.srem(LIMITS_INDEX, name)
        return bool(pipe.execute()[0])

    def keys_in_use(self, name: str) -> list[str]:
        """The keys of limit ``name`` used in the last ``KEY_IDLE_S`` (server time), sorted."""
        keys = _keys(name)
        seconds, micros = self.redis.time()
        found = self.redis.zrangebyscore(keys.keys, f"({seconds + micros / 1e6:.6f}", "+inf")
        return sorted(_text(k) for k in found)  # type: ignore[arg-type]

    def status(self, ref: LimitRef) -> dict[str, float]:
        """What ``fanout limits list`` shows: slots in use, and the seconds until the next
        call could pass (the rate's wait, or a push-back in force), on Redis server time; an
        auto limit's current rate too (``rate_now``, calls per second)."""
        config = self._config(resolve(ref)[0])
        keys = _keys(ref)
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        pipe.get(keys.tat)
        pipe.get(keys.backoff)
        pipe.zrange(keys.slots, 0, -1, withscores=True)
        pipe.hget(keys.aimd, "rate")
        (seconds, micros), tat, backoff, slots, rate_now = pipe.execute()
        now = seconds + micros / 1e6
        wait_s = 0.0
        found: dict[str, float] = {}
        interval_s = config.rate.emission_interval_s if config.rate is not None else 0.0
        if config.auto is not None:
            found["rate_now"] = round(float(rate_now or config.auto.start_rate), 2)
            interval_s = 1 / found["rate_now"]
        if interval_s and tat is not None:
            wait_s = max(0.0, float(tat) - now - (config.burst - 1) * interval_s)
        if backoff is not None:
            wait_s = max(wait_s, float(backoff) - now)
        return {"in_use": float(sum(1 for _, expiry in slots if expiry > now)),
                "wait_s": round(wait_s, 3), **found}

    # --- rate and push-back ---
    def try_acquire(
        self, name: LimitRef, cost: int = 1, *, headroom: float = 1.0, max_wait_s: float = 0.0,
        successes: int = 0,
    ) -> Permit:
        """Take ``cost`` from the limit's rate now, or learn how long to wait. A limit without
        a rate only refuses while it is pushed back. ``headroom`` stretches the interval
        between calls (1.02: 2% slower than the rate, for jitter on the way to the vendor).
        With ``max_wait_s``, a turn at most that far off is reserved: the permit is allowed
        and its ``wait_s`` says how long to sleep before the call. ``successes``: an auto
        limit's calls the vendor answered since the last report (they raise its rate first)."""
        args = _gcra_args(self._config(resolve(name)[0]), cost, headroom, max_wait_s,
                          name, successes)
        allowed, wait_s = self._gcra(self.redis, _keys(name), args)
        return Permit(bool(int(allowed)), float(wait_s))

    def acquire(
        self,
        name: LimitRef,
        *,
        max_wait_s: float,
        cost: int = 1,
        headroom: float = 1.0,
        sleep: Callable[[float], Any] = time.sleep,
        successes: int = 0,
    ) -> Permit:
        """Take from the rate, reserving a turn at most ``max_wait_s`` off and sleeping until
        it; a longer wait is returned, not allowed (the caller re-enqueues the work)."""
        permit = self.try_acquire(name, cost, headroom=headroom, max_wait_s=max_wait_s,
                                  successes=successes)
        if not (permit.allowed and permit.wait_s > 0):
            return permit
        sleep(permit.wait_s)
        # A push-back that began while this turn slept (a vendor's 429) holds it too.
        held_s = self.pushed_back_s(name)
        if held_s > max_wait_s:
            return Permit(False, held_s)
        if held_s > 0:
            sleep(held_s)
        return Permit(True, 0.0)

    async def acquire_async(
        self, name: LimitRef, *, max_wait_s: float, cost: int = 1, headroom: float = 1.0,
        config: LimitConfig | None = None, successes: int = 0,
    ) -> Permit:
        """``acquire`` for an event loop, on the loop's own Redis client (no executor thread):
        the loop's other calls go on while this one waits for its turn.

        A turn is a moment on Redis's clock, but the loop wakes a sleeper late whenever it is
        busy, and a call that goes out late lands next to the calls whose turns come after it
        (#20: up to 125 calls in a second at a 100/s limit). So after sleeping until its turn
        the call asks once more, just before it goes (``lua/limit_send.lua``): it passes only
        when ``SEND_GAP`` intervals have gone by since the last call that passed, and while
        the limit is not pushed back. A call within ``RESERVE_S`` of the gap's end reserves
        that moment and goes then, without asking again; a longer wait is waited out and asked
        again (a push-back meanwhile: a new turn after it, so the calls it held go out spaced,
        not all at once when it ends). An answer that reached the loop more than ``LATE_S``
        after Redis gave it, or a reserved moment woken more than ``WOKE_LATE_S`` late, is not
        used (the loop was busy: the call would go out late): it is given back
        (``lua/limit_unsend.lua``) and the call asks again.
        ``config``: the limit's configuration when the caller has it (saves a round trip)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        config = config or await self._config_async(resolve(name)[0])

        def budget_s() -> float:
            return max(0.0, max_wait_s - (loop.time() - started))

        gap: list[Any] = [0.0]
        if config.rate is not None and config.burst == 1:
            gap = [config.rate.emission_interval_s * SEND_GAP * cost, "", "", RESERVE_S]
        if config.auto is not None and config.burst == 1:  # turns 1 / rate apart, no headroom
            # No reserving: sends that exact ran an auto limit so close to the vendor's that
            # 3.47% of calls were refused (ratelimit auto case, 20261206T050341Z; 2.7-2.9%
            # asking again).
            gap = [0.0, AUTO_SEND_GAP * cost, config.auto.start_rate]
        while True:
            permit = await self._try_acquire_async(name, config, cost, headroom, budget_s(),
                                                   successes)
            successes = 0
            answered = loop.time()
            if not permit.allowed:
                return permit
            if permit.wait_s > 0:
                await asyncio.sleep(answered + permit.wait_s - loop.time())
            # The turn has come: the check may hold it up to max_wait_s more (a turn given up
            # for a short wait at the check would be a call the vendor never sees).
            started = loop.time()
            while True:
                go, wait_s, pushed = await self._send_check(name, gap)
                if go:
                    late_s = self._late_s(wait_s)
                    mark, before, reserved_s = pushed
                    if late_s <= LATE_S:
                        if reserved_s <= 0:
                            return Permit(True, 0.0)
                        due = loop.time() + reserved_s - late_s  # the reserved moment
                        await asyncio.sleep(due - loop.time())
                        if loop.time() - due <= WOKE_LATE_S:
                            return Permit(True, 0.0)
                    await self._give_back(name, (mark, before))
                    self.late_turns += 1
                    if self.late_turns % 100 == 0:
                        log.info("%d send checks of this process answered too late for the "
                                 "loop (busy), asked again", self.late_turns)
                    continue
                if wait_s > budget_s():
                    return Permit(False, wait_s)
                await asyncio.sleep(wait_s)
                if pushed:
                    break  # a new turn, after the push-back

    async def _send_check(self, name: LimitRef, gap: list[Any]) -> tuple[bool, float, Any]:
        """(go, then: the server's time and (its mark, the mark it replaced, the seconds to
        sleep until the moment reserved); else: seconds to wait, pushed back?)."""
        answer = await self._run_async(self._send, _keys(name), gap)
        if int(answer[0]):
            return True, float(answer[1]), (answer[3], answer[2], float(answer[4]))
        return False, float(answer[1]), bool(int(answer[2]))

    async def _give_back(self, name: LimitRef, marks: tuple[Any, Any]) -> None:
        """A pass whose call did not go: the next call may pass as if it had not been."""
        await self._run_async(self._unsend, _keys(name), [*marks, _SENT_TTL_MS])

    def _late_s(self, server_now: float) -> float:
        """How long ago, at most, Redis answered at ``server_now``: this loop's clock less
        Redis's is taken as the smallest difference seen yet (an answer that reached the loop
        at once), so the time the request waited for the loop before it went out (harmless:
        the answer is still fresh) does not count, only the time the answer waited for it."""
        aio = self._aio()
        offset = asyncio.get_running_loop().time() - server_now
        if aio is None:
            return 0.0
        aio.clock_offset[0] = min(aio.clock_offset[0], offset)
        return offset - aio.clock_offset[0]

    async def _try_acquire_async(
        self, name: LimitRef, config: LimitConfig, cost: int, headroom: float, max_wait_s: float,
        successes: int = 0,
    ) -> Permit:
        args = _gcra_args(config, cost, headroom, max_wait_s, name, successes)
        allowed, wait_s = await self._run_async(self._gcra, _keys(name), args)
        return Permit(bool(int(allowed)), float(wait_s))

    async def pushed_back_s_async(self, name: LimitRef) -> float:
        """``pushed_back_s`` on the loop's client."""
        aio = self._aio()
        if aio is None:
            return await asyncio.to_thread(self.pushed_back_s, name)
        pipe = aio.client.pipeline(transaction=False)
        pipe.time()
        pipe.get(_keys(name).backoff)
        (seconds, micros), until = await pipe.execute()
        return max(0.0, float(until or 0) - (seconds + micros / 1e6))

    async def push_back_async(self, name: LimitRef, until_s_from_now: float,
                              config: LimitConfig | None = None) -> float:
        """``push_back`` on the loop's client."""
        _check_push_back(until_s_from_now)
        args = [until_s_from_now, *_key_args(name), *_cut_args(config)]
        return float(await self._run_async(self._backoff, _keys(name), args))

    async def get_async(self, name: str) -> LimitConfig | None:
        """``get`` on the loop's client."""
        aio = self._aio()
        if aio is None:
            return await asyncio.to_thread(self.get, name)
        return _parse_config(name, await aio.client.hgetall(_keys(name).config))

    async def acquire_slot_async(self, name: LimitRef, holder_id: str, lease_s: float,
                                 config: LimitConfig | None = None) -> bool:
        """``acquire_slot`` on the loop's client."""
        config = config or await self._config_async(resolve(name)[0])
        if config.concurrency is None:
            raise ValueError(f"limit {label(name)!r} has no concurrency slots")
        _check_lease(holder_id, lease_s)
        args = [holder_id, lease_s, config.concurrency, *_key_args(name)]
        return bool(int(await self._run_async(self._slot_acquire, _keys(name), args)))

    async def _config_async(self, name: str) -> LimitConfig:
        config = await self.get_async(name)
        if config is None:
            raise UnknownLimit(name)
        return config

    def _aio(self) -> _LoopRedis | None:
        """The running loop's asyncio twin of ``self.redis`` (None: a connection kind it
        cannot copy, such as TLS; the calls then run in the loop's executor)."""
        loop = asyncio.get_running_loop()
        found = self._loops.get(loop)
        if found is None:
            client = _async_twin(self.redis)
            found = self._loops[loop] = None if client is None else \
                _LoopRedis(client, {}, [math.inf])
        return found

    async def _run_async(self, script: scripts.Script, keys: LimitKeys, args: list[Any]) -> Any:
        aio = self._aio()
        if aio is None:
            return await asyncio.to_thread(script, self.redis, keys, args)
        registered = aio.scripts.get(script.name)
        if registered is None:
            registered = aio.scripts[script.name] = aio.client.register_script(script.source)
        return await registered(keys=[str(getattr(keys, k)) for k in script.keys], args=args)

    def pushed_back_s(self, name: LimitRef) -> float:
        """Seconds until a push-back in force ends (0: none), on Redis server time."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        pipe.get(_keys(name).backoff)
        (seconds, micros), until = pipe.execute()
        return max(0.0, float(until or 0) - (seconds + micros / 1e6))

    def push_back(self, name: LimitRef, until_s_from_now: float,
                  config: LimitConfig | None = None) -> float:
        """Let nothing through the limit for ``until_s_from_now`` (a vendor's Retry-After), for
        every worker. A shorter push-back never shortens one in force. Returns the seconds until
        the limit opens again."""
        _check_push_back(until_s_from_now)
        args = [until_s_from_now, *_key_args(name), *_cut_args(config)]
        return float(self._backoff(self.redis, _keys(name), args))

    # --- concurrency ---
    def acquire_slot(self, name: LimitRef, holder_id: str, lease_s: float) -> bool:
        """Take a slot for ``holder_id`` until ``lease_s`` from now; False when all are taken."""
        config = self._config(resolve(name)[0])
        if config.concurrency is None:
            raise ValueError(f"limit {label(name)!r} has no concurrency slots")
        _check_lease(holder_id, lease_s)
        args = [holder_id, lease_s, config.concurrency, *_key_args(name)]
        return bool(int(self._slot_acquire(self.redis, _keys(name), args)))

    def renew_slot(self, name: LimitRef, holder_id: str, lease_s: float) -> bool:
        """Extend a live lease to ``lease_s`` from now; False when it has expired (or was never
        taken): the holder no longer has a slot."""
        _check_lease(holder_id, lease_s)
        return bool(int(self._slot_renew(self.redis, _keys(name), [holder_id, lease_s])))

    def release_slot(self, name: LimitRef, holder_id: str) -> bool:
        """Give the slot back; False when the holder had none (its lease had expired)."""
        return bool(self.redis.zrem(_keys(name).slots, holder_id))

    @contextmanager
    def slot(self, name: LimitRef, holder_id: str, lease_s: float) -> Iterator[Lease]:
        """Hold a slot while the body runs: renewed in a background thread every third of
        ``lease_s``, released on every exit. Raises SlotUnavailable when all are taken."""
        if not self.acquire_slot(name, holder_id, lease_s):
            raise SlotUnavailable(label(name))
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
                            "expire): %s", label(name), holder_id, exc)

    def _config(self, name: str) -> LimitConfig:
        config = self.get(name)
        if config is None:
            raise UnknownLimit(name)
        return config


class Lease:
    """A held slot, renewed by a daemon thread until ``stop``. ``lost`` turns true when a
    renewal found the lease expired (the process stalled longer than ``lease_s``)."""

    def __init__(
        self, name: LimitRef, holder_id: str, lease_s: float,
        renew: Callable[[LimitRef, str, float], bool],
    ) -> None:
        self.name, self.holder_id, self.lease_s = name, holder_id, lease_s
        self._renew = renew
        self._stopped = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-{label(name)}-{holder_id}", daemon=True
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


def make_config(
    name: str, rate: str | Rate | None, burst: int | None, concurrency: int | None, *,
    ceiling: str | Rate | None = None, floor: str | Rate | None = None,
) -> LimitConfig:
    """A limit's configuration, checked (ValueError with the reason), without Redis."""
    check_name(name)
    if rate == "auto":
        auto = AutoRate(_bound(name, "floor", floor or aimd.DEFAULT_FLOOR),
                        _bound(name, "ceiling", ceiling or aimd.DEFAULT_CEILING))
        if auto.floor.emission_interval_s < auto.ceiling.emission_interval_s:
            raise ValueError(f"limit {name!r}: the floor {auto.floor} is above the ceiling "
                             f"{auto.ceiling}")
        plain = make_config(name, "1/s", burst, concurrency)
        return LimitConfig(name, None, plain.burst, plain.concurrency, auto)
    if ceiling is not None or floor is not None:
        raise ValueError(f"limit {name!r}: a ceiling or a floor needs rate 'auto'")
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


def _bound(name: str, what: str, value: str | Rate) -> Rate:
    try:
        return Rate.parse(value) if isinstance(value, str) else value
    except ValueError as exc:
        raise ValueError(f"limit {name!r}: {what}: {exc}") from None


def _parse_config(name: str, fields: dict[Any, Any]) -> LimitConfig | None:
    if not fields:
        return None
    text = {_text(k): _text(v) for k, v in fields.items()}
    auto = None
    if text.get("rate") == "auto":
        auto = AutoRate(Rate.parse(text["floor"]), Rate.parse(text["ceiling"]))
    return LimitConfig(
        name,
        Rate.parse(text["rate"]) if "rate" in text and auto is None else None,
        int(text.get("burst", 1)),
        int(text["concurrency"]) if "concurrency" in text else None,
        auto,
    )


def _gcra_args(
    config: LimitConfig, cost: int, headroom: float, max_wait_s: float, ref: LimitRef,
    successes: int = 0,
) -> list[Any]:
    """``limit_gcra.lua``'s ARGV for one acquire (ValueError for a cost that never passes)."""
    if not _positive_int(cost):
        raise ValueError(f"cost must be a whole number >= 1, got {cost!r}")
    if config.has_rate and cost > config.burst:
        raise ValueError(f"cost {cost} exceeds the burst {config.burst} of limit "
                         f"{config.name!r}: it could never pass")
    interval_s = config.rate.emission_interval_s * headroom if config.rate else 0.0
    args = [interval_s, config.burst, cost, max_wait_s, *_key_args(ref)]
    if config.auto is not None:  # 1 / the rate found so far (no headroom: policy/aimd.py)
        args = [1.0, *args[1:], successes, *config.auto.aimd_args()]
    return args


def _cut_args(config: LimitConfig | None) -> list[Any]:
    """``limit_backoff.lua``'s last ARGV: cut an auto limit's rate (a 429 or a 503)."""
    if config is None or config.auto is None:
        return []
    return ["1", *config.auto.aimd_args()]


def _check_push_back(until_s_from_now: float) -> None:
    if not (isinstance(until_s_from_now, int | float) and math.isfinite(until_s_from_now)
            and until_s_from_now >= 0):
        raise ValueError(f"until_s_from_now must be seconds >= 0, got {until_s_from_now!r}")


class _LoopRedis(NamedTuple):
    client: aioredis.Redis
    scripts: dict[str, Any]  # script name -> its AsyncScript on this client
    clock_offset: list[float]  # [the loop's clock less Redis's, the smallest seen]


#: Connections of a loop's asyncio client: its calls in flight (a claimed batch: 64) wait
#: their turn for one (a round trip each) instead of failing with "Too many connections".
_LOOP_CONNECTIONS = 16


def _async_twin(client: redis.Redis) -> aioredis.Redis | None:
    """An asyncio client to the same Redis as ``client`` (plain TCP or a Unix socket)."""
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    common: dict[str, Any] = {
        k: kwargs[k] for k in ("db", "username", "password", "socket_timeout",
                               "socket_connect_timeout") if kwargs.get(k) is not None}
    if pool.connection_class is redis.UnixDomainSocketConnection:
        kind: Any = aioredis.UnixDomainSocketConnection
        common["path"] = kwargs["path"]
    elif pool.connection_class is redis.Connection:
        kind = aioredis.Connection
        common.update(host=kwargs.get("host", "localhost"), port=kwargs.get("port", 6379))
    else:
        return None
    return aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool(
        connection_class=kind, max_connections=_LOOP_CONNECTIONS, timeout=30,
        decode_responses=True, **common))


def _check_lease(holder_id: str, lease_s: float) -> None:
    if not (isinstance(holder_id, str) and holder_id):
        raise ValueError(f"holder_id must be a non-empty string, got {holder_id!r}")
    if not (isinstance(lease_s, int | float) and math.isfinite(lease_s) and lease_s > 0):
        raise ValueError(f"lease_s must be seconds > 0, got {lease_s!r}")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
