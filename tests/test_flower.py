"""Flower, started as a user starts it, watching real workers during a demo run: every item
appears as a task (the ones a claimed batch carried too), by name, with its run id; its API
wants the credentials; its broker view has every stage's queue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import VendorHandle, WorkerFactory, wait_for
from test_harvest import finish, run_demo

from workers.embedded_redis import free_port

AUTH = ("admin", "s3cret")


@pytest.fixture
def flower(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "producers.cli", "flower", "--port", str(port)],
        env={**os.environ, "FLOWER_BASIC_AUTH": ":".join(AUTH)}, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/api/workers", auth=AUTH, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout_s=60, what="Flower answering")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
        log.close()


def test_flower_sees_every_item_of_a_run(
    vendor: VendorHandle, start_worker: WorkerFactory, flower: str
) -> None:
    start_worker(concurrency=4, ready=True)
    vendor.configure(accounts=2, services=3)
    run_id = run_demo(vendor, days=4)
    summary = finish(run_id)
    assert summary["status"] == "succeeded"

    def tasks() -> dict[str, Any]:
        found = httpx.get(f"{flower}/api/tasks", params={"limit": 1000}, auth=AUTH, timeout=10)
        return {tid: t for tid, t in found.json().items() if tid.startswith(f"{run_id}.")}

    wait_for(lambda: len(tasks()) == 2 + 6 + 24, timeout_s=30, what="every item in Flower")
    seen = tasks()
    assert Counter(t["name"] for t in seen.values()) == {
        "demo.accounts": 2, "demo.services": 6, "demo.metric_day": 24}
    assert all(run_id in t["args"] for t in seen.values())
    assert {t["state"] for t in seen.values()} == {"SUCCESS"}
    # An item a task claimed besides its own message has one event; Flower still knows
    # when it was received and how long it ran.
    assert all(t["received"] and t["runtime"] is not None for t in seen.values())

    assert httpx.get(f"{flower}/api/tasks", timeout=10).status_code == 401
    answer = httpx.get(f"{flower}/api/queues/length", auth=AUTH, timeout=10)
    assert answer.status_code == 200, (answer.status_code, answer.text[:300])
    queues = answer.json()
    names = {q["name"] for q in queues["active_queues"]}
    assert {"fanout.demo.accounts", "fanout.demo.services", "fanout.demo.metric_day"} <= names
