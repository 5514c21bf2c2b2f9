"""A sink that cannot be opened is found when things start, in one line, not by a run that
stands still: ``fanout run`` and ``fanout demo`` refuse a sink they cannot open (a missing
database, nothing listening) with exit 2; a worker refuses a sink that can never work (exit 2)
and waits out one merely unreachable, telling it once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import fault_pipelines  # noqa: F401  (registers the pipelines in this process)
import pytest
import redis
from conftest import (
    POSTGRES_URL,
    WorkerFactory,
    postgres_problem,
    require_service,
    rows_at,
    wait_for,
)
from tcp_proxy import TcpProxy
from test_cli import assert_one_line_error, fanout
from test_runner_faults import WORKER_ENV
from test_sink_outage import through

from producers.trigger import start_run
from workers.embedded_redis import free_port
from workers.engine.services import services
from workers.keys import SINK_DOWN

MISSING_DB = POSTGRES_URL.rsplit("/", 1)[0] + "/fanout_no_such_db"


def nothing_listening() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/test"


@pytest.fixture(autouse=True)
def _postgres() -> None:
    problem = postgres_problem()
    if problem:
        require_service(problem)


@pytest.mark.parametrize("command", [["run", "demo", "--days", "1", "--wait"],
                                     ["demo", "--accounts", "1", "--days", "1"]])
def test_run_and_demo_refuse_a_missing_database(command: list[str]) -> None:
    result = fanout(*command, env={"FANOUT_SINK_URL": MISSING_DB}, timeout_s=60)
    assert_one_line_error(result, 'database "fanout_no_such_db" does not exist')
    assert result.stdout == ""


@pytest.mark.parametrize("command", [["run", "demo", "--days", "1", "--wait"],
                                     ["demo", "--accounts", "1", "--days", "1"]])
def test_run_and_demo_refuse_a_sink_with_nothing_listening(command: list[str]) -> None:
    url = nothing_listening()
    result = fanout(*command, env={"FANOUT_SINK_URL": url}, timeout_s=60)
    assert_one_line_error(result, "Connection refused")
    assert f"cannot open sink {url}" in result.stderr


def test_a_worker_refuses_a_sink_that_can_never_work(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers", "worker", "--pool", "threads",
         "--concurrency", "2", "--without-mingle", "--without-gossip"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "FANOUT_SINK_URL": MISSING_DB},
    )
    assert result.returncode == 2, result
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    # Celery's own warning about running as root aside, if it is.
    said = [line for line in output.splitlines() if "sink" in line]
    assert said == [f"fanout worker: cannot open sink {MISSING_DB}: connection failed: "
                    f'connection to server at "127.0.0.1", port 5432 failed: FATAL: '
                    f'database "fanout_no_such_db" does not exist'], said


def test_a_worker_with_its_sink_unreachable_at_start_waits_says_so_once_and_writes(
    start_worker: WorkerFactory, redis_client: redis.Redis, tmp_path: Path, postgres_url: str,
) -> None:
    server = urlsplit(postgres_url)
    proxy = TcpProxy(server.hostname or "127.0.0.1", server.port or 5432)
    try:
        proxy.cut()
        worker = start_worker({**WORKER_ENV, "FANOUT_SINK_URL": through(proxy, postgres_url)},
                              ready=True)
        assert worker.poll() is None
        log = tmp_path / "worker0.log"
        assert log.read_text().count("sink unreachable") == 1
        assert "Connection refused" in log.read_text()
        wait_for(lambda: redis_client.get(SINK_DOWN), what="the outage noted in Redis")

        run_id = start_run("sinkfaults", {}, roots=[0, 1, 2], root_stage="leaf")
        proxy.restore()
        assert services().ledger.view.wait(run_id, 60) == "succeeded"
    finally:
        proxy.close()
    assert [row[:6] for row in rows_at(postgres_url)] == [
        ("sinkfaults", "acct", f"svc-{n}", "m", "2026-01-01", float(n)) for n in (0, 1, 2)]
    text = log.read_text()
    assert text.count("sink unreachable") == 1 and text.count("sink is back after") == 1
    assert "Traceback" not in text
    assert redis_client.get(SINK_DOWN) is None
