"""Flower, started as a user starts it (`fanout flower`), watching real workers: every item
appears as a task (the ones a claimed batch carried too), by name, with its run id, in the
state it is in (FAILURE with its error and traceback, RETRY while retried or held back by a
global limit, which it names); its pages, /api and /metrics want the same credentials;
it keeps no more tasks than `--max-tasks`."""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fault_pipelines  # noqa: F401  (registers flaky in this process)
import httpx
import pytest
import redis
from conftest import VendorHandle, WorkerFactory, wait_for
from flower_pipelines import HELD_BATCH_LIMIT, HELD_LIMIT
from test_harvest import finish, run_demo

from producers.flower import DEFAULT_MAX_TASKS, DEFAULT_PURGE_OFFLINE_S
from producers.trigger import start_run
from workers.embedded_redis import free_port
from workers.engine.services import services
from workers.limits import Limits

AUTH = ("admin", "s3cret")
WORKER_ENV = {"PYTHONPATH": str(Path(__file__).resolve().parent),
              "FANOUT_PIPELINES": "fault_pipelines,flower_pipelines",
              "FANOUT_PREFETCH_MULTIPLIER": "1"}
FlowerFactory = Callable[..., str]


@pytest.fixture
def start_flower(tmp_path: Path) -> Iterator[FlowerFactory]:
    """``start_flower(*options, auth=AUTH)``: `fanout flower` on a free port, answering."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*options: str, auth: tuple[str, str] | None = AUTH) -> str:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
        if auth is not None:
            env["FLOWER_BASIC_AUTH"] = ":".join(auth)
        log = open(tmp_path / f"flower{len(started)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "producers.cli", "flower", "--port", str(port), *options],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        started.append(proc)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, (tmp_path / f"flower{len(started) - 1}.log").read_text()
            try:  # Flower's health check is open whatever the login
                return httpx.get(f"{url}/healthcheck", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout_s=60, what="Flower answering")
        return url

    yield start
    for proc in started:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


def flower_tasks(url: str, run_ids: set[str]) -> dict[str, dict[str, Any]]:
    """Flower's tasks of these runs, by task id."""
    found = httpx.get(f"{url}/api/tasks", params={"limit": 1000}, auth=AUTH, timeout=10)
    assert found.status_code == 200, found.text[:300]
    return {tid: t for tid, t in found.json().items() if tid.split(".")[0] in run_ids}


def events_counted(url: str) -> Counter[str]:
    """Flower's /metrics: events it has counted, by type (all tasks, all workers)."""
    text = httpx.get(f"{url}/metrics", auth=AUTH, timeout=10).text
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        found = re.match(r'flower_events_total\{.*type="([^"]+)".*\} ([0-9.e+]+)$', line)
        if found:
            counts[found[1]] += int(float(found[2]))
    return counts


def test_flower_sees_every_item_of_a_run(
    vendor: VendorHandle, start_worker: WorkerFactory, start_flower: FlowerFactory
) -> None:
    flower = start_flower()
    start_worker(concurrency=4, ready=True)
    vendor.configure(accounts=2, services=3)
    run_id = run_demo(vendor, days=4)
    summary = finish(run_id)
    assert summary["status"] == "succeeded"

    wait_for(lambda: len(flower_tasks(flower, {run_id})) == 2 + 6 + 24, timeout_s=30,
             what="every item in Flower")
    seen = flower_tasks(flower, {run_id})
    assert Counter(t["name"] for t in seen.values()) == {
        "demo.accounts": 2, "demo.services": 6, "demo.metric_day": 24}
    assert all(run_id in t["args"] for t in seen.values())
    assert {t["state"] for t in seen.values()} == {"SUCCESS"}
    # An item a task claimed besides its own message has one event; Flower still knows
    # when it was received and how long it ran.
    assert all(t["received"] and t["runtime"] is not None for t in seen.values())

    answer = httpx.get(f"{flower}/api/queues/length", auth=AUTH, timeout=10)
    assert answer.status_code == 200, (answer.status_code, answer.text[:300])
    queues = answer.json()
    names = {q["name"] for q in queues["active_queues"]}
    assert {"fanout.demo.accounts", "fanout.demo.services", "fanout.demo.metric_day"} <= names


def test_flower_shows_failures_retries_and_items_a_limit_holds_back(
    start_worker: WorkerFactory, start_flower: FlowerFactory, redis_client: redis.Redis
) -> None:
    flower = start_flower()
    limits = Limits(redis_client)
    for name in (HELD_LIMIT, HELD_BATCH_LIMIT):  # the first call passes, the next in an hour
        limits.set_limit(name, rate="1/h", burst=1)
    # Queued before the worker starts: its one thread takes "c" and claims "d" and "e" with it.
    flaky = start_run("flaky", {}, roots=["fail", "retry", "ok"], root_stage="leaf")
    held = start_run("held", {}, roots=["a", "b"], root_stage="leaf")
    held_batch = start_run("heldbatch", {}, roots=["c", "d", "e"], root_stage="leaf")
    start_worker(WORKER_ENV, concurrency=1)
    assert finish(flaky)["status"] == "partial"

    def item(task: dict[str, Any]) -> str:
        return str(ast.literal_eval(task["args"])[-1])

    def states() -> dict[str, str]:
        found = flower_tasks(flower, {flaky, held, held_batch})
        return {item(t): t["state"] for t in found.values()}

    expected = {"fail": "FAILURE", "retry": "SUCCESS", "ok": "SUCCESS", "a": "SUCCESS",
                "b": "RETRY", "c": "SUCCESS", "d": "RETRY", "e": "RETRY"}
    wait_for(lambda: states() == expected, timeout_s=60, what=f"Flower showing {expected}")
    tasks = {item(t): t for t in flower_tasks(flower, {flaky, held, held_batch}).values()}

    failed = tasks["fail"]
    assert failed["name"] == "flaky.leaf"
    assert failed["exception"] == "ValueError('fail on attempt 2')"
    assert 'in flaky_leaf\n    raise ValueError(f"{item} on attempt {ctx.attempt}")' \
        in failed["traceback"]
    assert failed["retries"] == 1  # its second attempt failed for good
    # Retried once, then succeeded: Flower keeps the retry's reason beside SUCCESS.
    assert tasks["retry"]["retries"] == 1
    assert "ValueError('retry on attempt 1')" in tasks["retry"]["exception"]
    # Held back: RETRY, its reason naming the limit; Celery's own event for "b" (the task's
    # own message), fanout's for "d" and "e" (claimed with "c").
    assert f"Throttled('rate limit {HELD_LIMIT}: wait " in tasks["b"]["exception"]
    for name in ("d", "e"):
        assert tasks[name]["exception"].startswith(f"Throttled: rate limit {HELD_BATCH_LIMIT}: "
                                                   "wait "), tasks[name]
        assert tasks[name]["retries"] == 0  # held back is not a failed attempt
    for run_id, counts in ((held, {"succeeded": 1, "throttled": 1}),
                           (held_batch, {"succeeded": 1, "throttled": 2})):
        snap = services().ledger.view.snapshot(run_id, ["leaf"])
        assert snap is not None
        leaf = snap.summary()["stages"]["leaf"]
        assert {k: leaf[k] for k in counts} == counts, leaf

    # The task pages a user opens say the same.
    page = httpx.get(f"{flower}/task/{failed['uuid']}", auth=AUTH, timeout=10).text
    assert "FAILURE" in page and "ValueError" in page and "in flaky_leaf" in page
    page = httpx.get(f"{flower}/task/{tasks['d']['uuid']}", auth=AUTH, timeout=10).text
    assert "RETRY" in page and f"rate limit {HELD_BATCH_LIMIT}: wait" in page


PAGES_API_METRICS = ("/", "/workers", "/tasks", "/broker", "/api/workers", "/api/tasks",
                     "/metrics")


def status(url: str, auth: tuple[str, str] | None = None) -> int:
    return httpx.get(url, auth=auth, timeout=10).status_code


def test_pages_api_and_metrics_want_the_same_credentials(start_flower: FlowerFactory) -> None:
    flower = start_flower()
    for path in PAGES_API_METRICS:
        assert status(flower + path) == 401, path
        assert status(flower + path, ("admin", "wrong")) == 401, path
        assert status(flower + path, AUTH) == 200, path
    assert "flower_events_total" in httpx.get(f"{flower}/metrics", auth=AUTH).text

    # --open-metrics: /metrics alone without them (a Prometheus scraper on this host).
    scraped = start_flower("--open-metrics")
    assert status(f"{scraped}/metrics") == 200
    for path in PAGES_API_METRICS[:-1]:
        assert status(scraped + path) == 401, path

    # No credentials configured (loopback only): pages and /metrics open, /api closed
    # (Flower's rule: FLOWER_UNAUTHENTICATED_API opens it).
    local = start_flower(auth=None)
    for path in ("/workers", "/tasks", "/metrics"):
        assert status(local + path) == 200, path
    assert status(f"{local}/api/tasks") == 401


def fanout_flower(*options: str, auth: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    if auth:
        env["FLOWER_BASIC_AUTH"] = ":".join(AUTH)
    return subprocess.run([sys.executable, "-m", "producers.cli", "flower", *options],
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("options", "auth", "says"), [
    (["--address", "0.0.0.0"], False, "refusing to serve Flower on '0.0.0.0' without "
                                      "FLOWER_BASIC_AUTH=user:password"),
    (["--address", "0.0.0.0", "--open-metrics"], True, "--open-metrics serves /metrics to "
                                                       "anyone who reaches it"),
    (["--max-tasks", "0"], True, "argument --max-tasks: must be >= 1, got 0"),
])
def test_flower_refuses_an_open_door_in_one_line(
    options: list[str], auth: bool, says: str
) -> None:
    result = fanout_flower(*options, auth=auth)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr


def test_flower_keeps_the_latest_max_tasks_and_counts_every_event(
    vendor: VendorHandle, start_worker: WorkerFactory, start_flower: FlowerFactory
) -> None:
    flower = start_flower("--max-tasks", "5")
    start_worker(concurrency=4, ready=True)
    vendor.configure(accounts=1, services=2)
    run_id = run_demo(vendor, days=4)
    assert finish(run_id)["status"] == "succeeded"
    # 1 account + 2 services + 8 metric-days, each one task-succeeded event.
    wait_for(lambda: events_counted(flower)["task-succeeded"] == 11, timeout_s=30,
             what="Flower counting 11 items")
    assert len(flower_tasks(flower, {run_id})) == 5


def test_flower_is_started_with_fanouts_bounds(start_flower: FlowerFactory) -> None:
    url = start_flower()
    port = url.rsplit(":", 1)[1]
    (pid,) = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).count(
        f"--port={port}")]
    args = _cmdline(pid)
    assert f"--max_tasks={DEFAULT_MAX_TASKS}" in args
    assert f"--purge_offline_workers={DEFAULT_PURGE_OFFLINE_S}" in args


def _cmdline(pid: str) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return []
