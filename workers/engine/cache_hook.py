"""Input caching (Prefect's ``cache_policy=INPUTS`` with ``cache_expiration``), in Redis, so
every worker on every host shares it: ``@flow.stage(..., cache="inputs", cache_ttl_s=86400)``
or a ``cache_key=fn(ctx, item)``. A hit skips the call and is counted ``cached``; what the
stage produced is kept whole (children, records, value, next loop), so a cached mapped stage
still fans out. A run started with ``refresh_cache=True`` ignores what is kept and overwrites it.
Keys: ``keys.cache(TASK, KEY)``, each with the stage's TTL.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis

from workers import keys
from workers.context import StageContext
from workers.hooks import Decision, Hook, Serve, StageResult
from workers.ids import canonical_json
from workers.policy.cache_options import OPTIONS

if TYPE_CHECKING:
    from workers.api import Stage

CacheKeyFn = Callable[[StageContext, Any], str]


class CacheError(Exception):
    """The stage's arguments cannot make a cache key."""


def inputs_key(ctx: StageContext, item: Any) -> str:
    """The stage's inputs: its item, and the loop state of this iteration."""
    try:
        text = json.dumps([item, ctx.loop.iteration, ctx.loop.payload], sort_keys=True,
                          separators=(",", ":"))
    except TypeError as exc:
        raise CacheError(f"cache='inputs' needs JSON arguments: {exc}") from None
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class CacheHook(Hook):
    def __init__(self, client: redis.Redis, ttl_s: float, key_fn: CacheKeyFn) -> None:
        self.redis = client
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.key_fn = key_fn

    def _key(self, ctx: StageContext, item: Any) -> str:
        key = self.key_fn(ctx, item)
        if not isinstance(key, str) or not key:
            raise CacheError(f"cache_key of {ctx.task_name} returned {key!r}, not a string")
        return keys.cache(ctx.task_name, key)

    def before(self, ctx: StageContext, item: Any) -> Decision | None:
        if ctx.params.get("refresh_cache"):
            return None
        kept = self.redis.get(self._key(ctx, item))
        return Serve(StageResult.from_json(json.loads(kept))) if kept else None

    def after(self, ctx: StageContext, item: Any, result: StageResult) -> None:
        text = canonical_json(result.to_json())
        self.redis.set(self._key(ctx, item), text, px=self.ttl_ms)


def for_stage(stage: Stage, client: redis.Redis) -> tuple[Hook, ...]:
    """The cache a stage's options ask for (``policy/cache_options.py``), if any."""
    options = OPTIONS.of(stage.options)
    if not (options["cache"] or options["cache_key"]):
        return ()
    return (CacheHook(client, options["cache_ttl_s"], options["cache_key"] or inputs_key),)


def clear(client: redis.Redis, task_name: str | None = None) -> int:
    """Forget what is cached, of one stage (``PIPELINE.STAGE``) or of all. Returns how many."""
    removed = 0
    for key in client.scan_iter(match=keys.cache(task_name or "*", "*"), count=1000):
        removed += int(client.delete(key))
    return removed
