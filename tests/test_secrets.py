"""A Redis with a password: everything works through its URL, and the password shows up in
no output, error line or log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import VendorHandle, WorkerFactory

from workers import embedded_redis

SECRET = "s3cret-pw"


@pytest.fixture
def protected_redis_url() -> Iterator[str]:
    port = embedded_redis.free_port()
    proc = embedded_redis.start_server(Path(tempfile.mkdtemp(prefix="fanout-pw-")), port,
                                       appendonly=False, daemonize=False)
    try:
        embedded_redis.wait_ready(f"redis://127.0.0.1:{port}/0")
        redis.Redis(port=port).config_set("requirepass", SECRET)
        yield f"redis://:{SECRET}@127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def fanout(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "producers.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "FANOUT_REDIS_URL": url})


def test_a_password_protected_redis_works_and_its_password_is_never_shown(
    vendor: VendorHandle, start_worker: WorkerFactory, protected_redis_url: str,
    tmp_path: Path,
) -> None:
    worker = start_worker({"FANOUT_REDIS_URL": protected_redis_url})
    done = fanout("run", "demo", "--days", "2", "--end-day", "2026-01-31", "--vendor-url",
                  vendor.url, "-p", "http_retries=0", "--wait", "--json", url=protected_redis_url)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["status"], summary["rows_written"]) == ("succeeded", 12)
    listed = fanout("status", url=protected_redis_url)
    assert listed.returncode == 0 and summary["run_id"] in listed.stdout

    wrong = fanout("status", url=protected_redis_url.replace(SECRET, "not-it"))
    assert wrong.returncode == 2
    assert wrong.stderr.startswith("fanout: error: cannot reach Redis at redis://:***@127.0.0.1")

    worker.terminate()
    worker.wait(20)
    for text in (done.stdout, done.stderr, listed.stdout, listed.stderr, wrong.stderr,
                 (tmp_path / "worker0.log").read_text()):
        assert SECRET not in text and "not-it" not in text
