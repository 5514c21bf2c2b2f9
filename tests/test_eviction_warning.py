"""A Redis that may evict keys under memory pressure would lose run ledgers and queued
messages without a trace: a worker says so once when it starts. Against the test session's
real Redis, its policy changed for the test and put back after."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import WorkerFactory

from workers.connections import warn_if_evicting

WARNING = "may evict keys (maxmemory-policy allkeys-lru)"


@pytest.fixture
def evicting(redis_client: redis.Redis) -> Iterator[None]:
    before = str(redis_client.config_get("maxmemory-policy")["maxmemory-policy"])
    redis_client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        yield
    finally:
        redis_client.config_set("maxmemory-policy", before)


def test_no_warning_for_a_redis_that_never_evicts(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    assert redis_client.info("memory")["maxmemory_policy"] == "noeviction"
    with caplog.at_level(logging.WARNING, logger="fanout"):
        assert warn_if_evicting(redis_client, "the run ledger") is None
    assert caplog.records == []


@pytest.mark.usefixtures("evicting")
def test_a_redis_that_may_evict_is_named_with_its_policy(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fanout"):
        assert warn_if_evicting(redis_client, "the run ledger") == "allkeys-lru"
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"the Redis of the run ledger {WARNING}")
    assert "noeviction" in line


@pytest.mark.usefixtures("evicting")
def test_a_worker_says_it_once_when_it_starts(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    start_worker(ready=True)
    log = (tmp_path / "worker0.log").read_text()
    # worker_ready has run by the time "ready." is written: the warning comes before it.
    assert log.count(WARNING) == 1, log[-2000:]
