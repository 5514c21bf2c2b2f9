"""The input cache, shared by every worker through Redis (seed 004's cache_policy=INPUTS)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cache_pipelines
import redis
from conftest import VendorHandle, WorkerFactory, sink_rows, wait_for

from producers.trigger import start_run
from workers import keys
from workers.engine.services import services

TESTS = Path(__file__).resolve().parent
WORKER_ENV = {"PYTHONPATH": str(TESTS), "FANOUT_PIPELINES": "cache_pipelines"}


def run(vendor: VendorHandle, **params: Any) -> dict[str, Any]:
    run_id = start_run("cachetest", {"vendor_url": vendor.url, "end_day": "2026-01-31",
                                     **params}, roots=["acct-001", "acct-002"],
                       root_stage="listing")
    ledger = services().ledger
    assert ledger.view.wait(run_id, 60) is not None
    snap = ledger.view.snapshot(run_id, ["listing", "metric"])
    assert snap is not None
    return snap.summary()


def requests(vendor: VendorHandle) -> dict[str, int]:
    return {k: v for k, v in vendor.stats()["by_endpoint"].items() if v}


def cached_keys(client: redis.Redis, task_name: str) -> list[str]:
    return sorted(client.scan_iter(match=keys.cache(task_name, "*")))


def test_a_second_run_is_served_from_the_cache_until_it_expires(
    vendor: VendorHandle, start_worker: WorkerFactory, sink_path: Path,
    redis_client: redis.Redis,
) -> None:
    vendor.configure(accounts=2, services=3)
    start_worker(WORKER_ENV)
    first = run(vendor)
    assert first["status"] == "succeeded"
    assert (first["stages"]["metric"]["succeeded"], first["rows_written"]) == (12, 12)
    assert requests(vendor) == {"services": 2, "metrics": 12}
    rows = sink_rows(sink_path)

    second = run(vendor)
    assert second["status"] == "succeeded"
    # Both stages served from the cache: the cached listing still fanned out its 12 children.
    assert second["stages"]["listing"]["cached"] == 2
    assert (second["stages"]["metric"]["enqueued"], second["stages"]["metric"]["cached"]) == \
        (12, 12)
    assert second["rows_written"] == 12
    assert requests(vendor) == {"services": 2, "metrics": 12}  # no new request
    assert [r[:6] for r in sink_rows(sink_path)] == [r[:6] for r in rows]

    # Each stage's entries carry its TTL: the metric's CACHE_TTL_S, the listing's a day.
    metric_keys = cached_keys(redis_client, "cachetest.metric")
    listing_keys = cached_keys(redis_client, "cachetest.listing")
    assert (len(metric_keys), len(listing_keys)) == (12, 2)
    assert all(0 < redis_client.pttl(k) <= cache_pipelines.CACHE_TTL_S * 1000
               for k in metric_keys)
    assert all(cache_pipelines.CACHE_TTL_S * 1000 < redis_client.pttl(k) <= 86_400_000
               for k in listing_keys)
    # The metric entries' TTL runs out now (Redis expires them, as it would after
    # CACHE_TTL_S); the listing's do not.
    for key in metric_keys:
        redis_client.pexpire(key, 1)
    wait_for(lambda: redis_client.exists(*metric_keys) == 0, what="the metric cache expired")
    third = run(vendor)
    assert third["stages"]["listing"]["cached"] == 2
    assert third["stages"]["metric"]["succeeded"] == 12
    assert requests(vendor) == {"services": 2, "metrics": 24}

    forced = run(vendor, refresh_cache=True)
    assert forced["stages"]["listing"]["succeeded"] == 2
    assert forced["stages"]["metric"]["succeeded"] == 12
    assert requests(vendor) == {"services": 4, "metrics": 36}


def test_cache_clear(vendor: VendorHandle, start_worker: WorkerFactory) -> None:
    vendor.configure(accounts=2, services=3)
    start_worker(WORKER_ENV)
    run(vendor)
    env = {**os.environ, "FANOUT_PIPELINES": "cache_pipelines",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}

    def clear(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "producers.cli", "cache", "clear", *args],
                              capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert clear("cachetest.listing") == "cleared 2 cached results of cachetest.listing"
    assert run(vendor)["stages"]["listing"]["succeeded"] == 2
    assert clear() == "cleared 14 cached results"


def test_github_stars_example_uses_retries_a_limit_and_the_cache(redis_url: str) -> None:
    script = str(TESTS.parent / "examples" / "github_stars.py")
    env = {**os.environ, "FANOUT_REDIS_URL": redis_url}
    first = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env,
                           timeout=180)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.strip().splitlines()
    assert lines[0] == "fetch_stats: 3 fetched, 0 cached, 0 retried"
    assert [line.split(":")[0] for line in lines[1:]] == [
        "PrefectHQ/prefect", "pydantic/pydantic", "huggingface/transformers"]
    assert all(line.endswith(" stars") for line in lines[1:])
    second = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env,
                            timeout=180)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip().splitlines() == [
        "fetch_stats: 0 fetched, 3 cached, 0 retried", *lines[1:]]
