"""Where Redis is, and one shared client per process (redis-py's pool is thread-safe).

The client's pool is sized from the threads that share it (``size_pools``, told by the worker
at its start: its pool's threads) and waits when every connection is taken, instead of
failing with "Too many connections" (redis-py's default pool holds 100 and then raises: a
worker with 256 threads left claimed messages stranded). The event loop of async stages is
one thread, however many calls it has in flight.
"""

from __future__ import annotations

import functools
import logging

import redis

from workers import embedded_redis
from workers.redact import redact
from workers.settings import ConfigError, Settings, get_settings

log = logging.getLogger("fanout")


def resolve_redis_url(settings: Settings | None = None) -> str:
    """FANOUT_REDIS_URL when set, otherwise the embedded server (started if needed)."""
    settings = settings or get_settings()
    if settings.redis_url:
        return settings.redis_url
    return embedded_redis.ensure_running(settings.home)


def resolve_broker_url(settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    return settings.broker_url or resolve_redis_url(settings)


def check_reachable(url: str) -> None:
    """Raise ConfigError (one clear line) when Redis at ``url`` does not answer."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        client.ping()
    except ValueError as exc:
        raise ConfigError(f"bad Redis URL {redact(url)!r}: {exc}") from None
    except (redis.RedisError, OSError) as exc:
        raise ConfigError(f"cannot reach Redis at {redact(url)}: {exc}") from None


#: Connections a process needs besides one per thread that runs tasks: the event loop and
#: its executor, the heartbeat, mover and reaper, lease renewals, the sink gate.
SPARE_CONNECTIONS = 24
#: The most connections a process opens to one Redis: beyond it, threads wait their turn (a
#: command holds a connection for a round trip), and Redis's own client limit stays far off.
MAX_POOL = 512
#: How long a command waits for a connection before it fails (a Redis error: its batch goes
#: back). A healthy pool frees one within a round trip.
POOL_WAIT_S = 30.0


class _Pools:
    threads = 100 - SPARE_CONNECTIONS  # until told: redis-py's default of 100 connections


def size_pools(threads: int) -> int:
    """Size the Redis pools for ``threads`` threads running tasks (a worker calls this at
    its start, before any client exists). Returns the pool size."""
    _Pools.threads = max(1, threads)
    return pool_size()


def pool_size() -> int:
    """Connections per Redis client of this process."""
    return min(MAX_POOL, _Pools.threads + SPARE_CONNECTIONS)


@functools.cache
def _client_for(url: str) -> redis.Redis:
    pool = redis.BlockingConnectionPool.from_url(
        url, decode_responses=True, health_check_interval=30, max_connections=pool_size(),
        timeout=POOL_WAIT_S,
    )
    return redis.Redis(connection_pool=pool)


def broker_redis(broker_url: str) -> redis.Redis | None:
    """A client for the broker when it is Redis (fanout then publishes to it directly)."""
    if not broker_url.startswith(("redis://", "rediss://")):
        return None
    return _client_for(broker_url)


def get_redis() -> redis.Redis:
    """The process-wide Redis client for the ledger (strings in, strings out)."""
    return _client_for(resolve_redis_url())


def warn_if_evicting(client: redis.Redis, what: str) -> str | None:
    """Log a warning when this Redis may evict keys under memory pressure: a run's ledger or
    a queued message could then vanish without a trace (a worker calls this once, at start).
    Returns the policy when it is not ``noeviction`` (read from INFO, which managed Redis
    services allow where CONFIG is often disabled); None when it is, or cannot be read."""
    try:
        policy = str(client.info("memory").get("maxmemory_policy", "noeviction"))
    except redis.RedisError:
        return None
    if policy == "noeviction":
        return None
    log.warning("the Redis of %s may evict keys (maxmemory-policy %s): a run's ledger or a "
                "queued message could be lost; set maxmemory-policy noeviction", what, policy)
    return policy
