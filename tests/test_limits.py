"""Global limits on real workers against the demo vendor: a rate every worker on every host
shares, concurrency slots that a killed worker cannot leak, and a vendor's 429 that slows
everyone. (The arithmetic and the Lua scripts have their own tests: test_policy_gcra.py,
test_limits_lua.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis
from conftest import VendorHandle, WorkerFactory, wait_for
from test_harvest import finish, run_demo

from workers.limits import Limits
from workers.pipelines.demo import VENDOR_LIMIT


def test_a_shared_rate_keeps_three_workers_under_the_vendors_own_limit(
    vendor: VendorHandle, start_worker: WorkerFactory, redis_client: redis.Redis
) -> None:
    # fanout's limit is half the vendor's own: calls are spaced at fanout's rate on Redis time
    # but reach the vendor after a delay a loaded machine stretches, so at the vendor's exact
    # rate one late call makes 51 in a second (seen: 1-2 429s of 303). Half leaves up to a
    # second of delay; 12 threads calling at 0 ms without the shared limit would exceed 50/s
    # many times over, and the vendor's 429s would show it.
    rate, vendor_rate = 25, 50
    vendor.configure(accounts=2, services=5, rate_limit_rps=vendor_rate)
    Limits(redis_client).set_limit(VENDOR_LIMIT, rate=f"{rate}/s", burst=1)
    for _ in range(3):
        start_worker(concurrency=4)
    summary = finish(run_demo(vendor, days=30))

    assert summary["status"] == "succeeded"
    assert summary["rows_written"] == 300
    stats = vendor.stats()
    requests = stats["total"]
    # The accounts, one page of services each, the leaves: nothing refused, nothing again.
    assert requests == 1 + 2 + 300, {k: stats[k] for k in ("status", "max_rps_1s", "total")}
    assert stats["sent_429"] == 0
    assert stats["max_rps_1s"] <= vendor_rate
    # fanout's limit at the vendor's exact rate, and how close the wall time comes to
    # requests / rate (DESIGN: <= 1.10x, 0 429s), depend on the machine:
    # benchmarks/ratelimit.py measures them, with 3 workers of 8 threads.


def test_concurrency_slots_cap_calls_in_flight_and_come_back_from_a_dead_worker(
    vendor: VendorHandle, start_worker: WorkerFactory, redis_client: redis.Redis
) -> None:
    slots, lease = 3, {"FANOUT_LIMIT_LEASE_S": "2"}
    vendor.configure(accounts=2, services=3, latency_ms=250)
    limits = Limits(redis_client)
    limits.set_limit(VENDOR_LIMIT, concurrency=slots)
    victim = start_worker(lease, concurrency=8)
    run_id = run_demo(vendor, days=6)
    wait_for(lambda: limits.status(VENDOR_LIMIT)["in_use"] == slots, what="every slot taken")
    os.killpg(victim.pid, signal.SIGKILL)  # it dies holding them
    victim.wait()
    assert limits.status(VENDOR_LIMIT)["in_use"] == slots
    start_worker({**lease, "FANOUT_VISIBILITY_TIMEOUT_S": "3"}, concurrency=8)
    # The dead worker's leases run out and the newcomer takes the slots.
    summary = finish(run_id, timeout_s=90)

    assert summary["status"] == "succeeded"
    assert summary["rows_written"] == 36
    assert vendor.stats()["max_in_flight"] == slots
    # A late duplicate copy may still hold a slot for a moment; then every slot is free.
    wait_for(lambda: limits.status(VENDOR_LIMIT)["in_use"] == 0, what="every slot given back")


def test_a_429_with_retry_after_holds_every_worker(
    vendor: VendorHandle, start_worker: WorkerFactory, redis_client: redis.Redis
) -> None:
    # A call already sent when the 429 came back cannot be recalled: the vendor counts it a
    # violation. At 5/s the next call is due 200 ms after the refused one, so the push-back
    # (one Redis call after the 429 arrives) lands before it even on a loaded machine; at 20/s
    # (50 ms) it sometimes did not (1 violation, seen under load).
    Limits(redis_client).set_limit(VENDOR_LIMIT, rate="5/s")
    for _ in range(2):
        start_worker(concurrency=4)
    vendor.configure(accounts=2, services=3)
    started = time.monotonic()
    run_id = run_demo(vendor, days=6)
    wait_for(lambda: vendor.stats()["by_endpoint"].get("metrics", 0) >= 5,
             what="the harvest under way")
    vendor.configure(burst_429={"count": 1, "retry_after_s": 2})  # the next call is refused
    summary = finish(run_id)
    wall_s = time.monotonic() - started

    assert summary["status"] == "succeeded"
    assert summary["rows_written"] == 36
    stats = vendor.stats()
    assert stats["sent_429"] == 1
    # Nobody, on any worker, called the vendor while its Retry-After was running.
    assert stats["retry_after_violations"] == 0
    assert wall_s >= 2


def test_limits_commands(redis_url: str) -> None:
    def fanout(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "producers.cli", "limits", *args],
                              capture_output=True, text=True, timeout=60,
                              env=os.environ.copy())

    assert fanout("set", "github-api", "--rate", "60/h", "--burst", "3").stdout.strip() == \
        "limit github-api: rate 60/h, burst 3"
    assert fanout("set", "db", "--concurrency", "4").returncode == 0
    listed = json.loads(fanout("list", "--json").stdout)
    assert listed == [
        {"name": "db", "rate": None, "burst": None, "concurrency": 4, "in_use": 0, "wait_s": 0.0,
         "keys": []},
        {"name": "github-api", "rate": "60/h", "burst": 3, "concurrency": None, "in_use": 0,
         "wait_s": 0.0, "keys": []},
    ]
    bad = fanout("set", "x", "--rate", "60/fortnight")
    assert bad.returncode == 2 and bad.stderr.startswith("fanout: error: bad rate '60/fortnight'")
    assert fanout("delete", "db").returncode == 0
    missing = fanout("delete", "db")
    assert missing.returncode == 2 and "no limit named 'db'" in missing.stderr
    assert [row["name"] for row in json.loads(fanout("list", "--json").stdout)] == ["github-api"]


def test_limits_apply_creates_or_replaces_the_config_files_limits(
    redis_url: str, tmp_path: Path
) -> None:
    def fanout(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "producers.cli", "limits", *args],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "FANOUT_CONFIG": str(config)})

    config = tmp_path / "fanout.toml"
    config.write_text('[limits.vendor-a]\nrate = "50/s"\nburst = 5\n\n'
                      '[limits.vendor-b]\nconcurrency = 3\n')
    assert fanout("set", "vendor-a", "--concurrency", "9", config=config).returncode == 0
    applied = fanout("apply", config=config)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines() == ["limit vendor-a: rate 50/s, burst 5",
                                           "limit vendor-b: concurrency 3"]
    listed = json.loads(fanout("list", "--json", config=config).stdout)
    assert listed == [  # vendor-a replaced: its concurrency 9 is gone
        {"name": "vendor-a", "rate": "50/s", "burst": 5, "concurrency": None, "in_use": 0,
         "wait_s": 0.0, "keys": []},
        {"name": "vendor-b", "rate": None, "burst": None, "concurrency": 3, "in_use": 0,
         "wait_s": 0.0, "keys": []},
    ]

    # A bad limit is one line, and nothing of the file is applied.
    config.write_text('[limits.vendor-a]\nrate = "10/s"\n\n[limits.vendor-c]\nburst = 2\n')
    bad = fanout("apply", config=config)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("fanout: error: " + str(config) + ": limit 'vendor-c' needs "
                                  "a rate, a concurrency, or both")
    assert json.loads(fanout("list", "--json", config=config).stdout)[0]["rate"] == "50/s"
    config.write_text('[schedules]\n')
    empty = fanout("apply", config=config)
    assert empty.returncode == 2
    assert empty.stderr.strip() == f"fanout: error: no [limits.NAME] tables in {config}"
