"""The ``fanout`` command line as a user runs it: real processes, exit codes, JSON contract."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import redis
from conftest import VendorHandle, WorkerFactory, wait_for

from producers.commands import describe_attempts
from workers.embedded_redis import free_port
from workers.redact import redact

SUMMARY_KEYS = {"run_id", "pipeline", "status", "stages", "rows_written", "wall_s"}
COUNTER_KEYS = {"enqueued", "succeeded", "failed", "cached", "retried", "throttled", "skipped"}


def fanout(*args: str, env: dict[str, str] | None = None, timeout_s: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "producers.cli", *args],
        capture_output=True, text=True, timeout=timeout_s, env={**os.environ, **(env or {})},
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fanout: error: ")
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run", "demo", "--days", "-1"], "--days: must be >= 1"),
        (["run", "demo", "--days", "x"], "expected a whole number"),
        (["run", "nosuch", "--days", "1"], "unknown pipeline 'nosuch'"),
        (["demo", "--error-rate", "2"], "must be between 0 and 1"),
        (["run", "demo", "--end-day", "yesterday"], "--end-day must be YYYY-MM-DD"),
        (["frobnicate"], "invalid choice"),
        (["flower", "--address", "0.0.0.0"], "refusing to serve Flower on '0.0.0.0' without "
                                             "FLOWER_BASIC_AUTH"),
        (["cache", "clear", "demo.nope"], "pipeline 'demo' has no stage 'nope' (give PIPELINE "
                                          "or PIPELINE.STAGE; stages: accounts, services, "
                                          "metric_day)"),
        (["cache", "clear", "nosuch"], "unknown pipeline 'nosuch' (known: demo, demo_report)"),
        (["results", "no-such-run"], "run no-such-run is unknown or expired"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], fragment: str) -> None:
    assert_one_line_error(fanout(*args, env={"FLOWER_BASIC_AUTH": ""}), fragment)


def test_a_pipeline_module_that_fails_to_import_is_one_line_and_exit_2() -> None:
    result = fanout("status", env={"FANOUT_PIPELINES": "nosuch.module"})
    assert_one_line_error(result, "cannot import pipeline module 'nosuch.module'")
    assert "No module named 'nosuch'" in result.stderr


def test_an_unknown_run_is_one_line_and_exit_2() -> None:
    assert_one_line_error(fanout("status", "no-such-run"), "run no-such-run is unknown")
    assert_one_line_error(fanout("failures", "no-such-run"), "run no-such-run is unknown")


def test_unreachable_redis_is_one_line_and_exit_2() -> None:
    result = fanout("status", env={"FANOUT_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert_one_line_error(result, "cannot reach Redis at redis://127.0.0.1:1/0")


class RedisThatDiesAfterPing:
    """A socket server speaking just enough RESP to pass the start-up check (HELLO, PING,
    CLIENT SETINFO); any other command finds the connection closed, as if Redis died right
    after the check."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.server.getsockname()[1]}/0"
        self.dropped = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            reader = conn.makefile("rb")
            while True:
                header = reader.readline()  # *N: a command of N bulk strings
                if not header.startswith(b"*"):
                    return
                words = []
                for _ in range(int(header[1:])):
                    size = int(reader.readline()[1:])
                    words.append(reader.read(size + 2)[:-2].upper())
                if words[0] == b"HELLO":  # redis-py asks for RESP3
                    conn.sendall(b"%2\r\n$5\r\nproto\r\n:3\r\n$6\r\nserver\r\n$5\r\nredis\r\n")
                elif words[0] == b"PING":
                    conn.sendall(b"+PONG\r\n")
                elif words[0] == b"CLIENT":
                    conn.sendall(b"+OK\r\n")
                else:
                    self.dropped += 1
                    return

    def close(self) -> None:
        self.server.close()


def test_redis_lost_mid_command_is_one_line_and_exit_1() -> None:
    dying = RedisThatDiesAfterPing()
    try:
        result = fanout("failures", "some-run", env={"FANOUT_REDIS_URL": dying.url})
    finally:
        dying.close()
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fanout: error: lost Redis or the broker: ConnectionError")
    assert "Traceback" not in result.stderr
    assert dying.dropped >= 1


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"FANOUT_VISIBILITY_TIMEOUT_S": "soon"},
         "FANOUT_VISIBILITY_TIMEOUT_S must be a whole number, got 'soon'"),
        ({"FANOUT_SINK_URL": "mysql://u:secret@db/x"},
         "unsupported FANOUT_SINK_URL 'mysql://u:***@db/x'"),
        ({"FANOUT_BROKER_URL": "amqp://guest:secret@127.0.0.1:1//"},
         "cannot reach the broker at amqp://guest:***@127.0.0.1:1//"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(env: dict[str, str], fragment: str) -> None:
    result = fanout("status", env=env)
    assert_one_line_error(result, fragment)
    assert "secret" not in result.stderr


def test_unreachable_vendor_is_one_line_and_exit_2() -> None:
    result = fanout("run", "demo", "--days", "1", "--vendor-url", "http://127.0.0.1:1",
                    "-p", "http_retries=0")
    assert_one_line_error(result, "cannot list the root items of 'demo'")


def test_run_wait_json_reports_partial_with_exit_1(
    vendor: VendorHandle, start_worker: WorkerFactory
) -> None:
    vendor.configure(accounts=1, services=2,
                     fail_paths={"/accounts/acct-001/services/svc-002/metrics?day=2026-01-30": 9})
    start_worker()
    result = fanout("run", "demo", "--days", "3", "--end-day", "2026-01-31",
                    "--vendor-url", vendor.url, "-p", "http_retries=0", "--wait", "--json")
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary) == SUMMARY_KEYS
    assert summary["status"] == "partial"
    assert summary["pipeline"] == "demo"
    assert list(summary["stages"]) == ["accounts", "services", "metric_day"]
    assert all(set(counts) == COUNTER_KEYS for counts in summary["stages"].values())
    assert summary["stages"]["metric_day"]["succeeded"] == 5
    assert summary["stages"]["metric_day"]["failed"] == 1
    assert summary["rows_written"] == 5

    status = fanout("status", summary["run_id"], "--json")
    assert status.returncode == 1  # `status` exits like the run it shows
    again = json.loads(status.stdout.strip().splitlines()[-1])
    assert {k: v for k, v in again.items() if k != "wall_s"} == {
        k: v for k, v in summary.items() if k != "wall_s"
    }
    failures = json.loads(fanout("failures", summary["run_id"], "--json").stdout)
    assert [f["item"]["day"] for f in failures.values()] == ["2026-01-30"]


def test_demo_twice_on_the_embedded_redis(tmp_path: Path) -> None:
    """`fanout demo` with no FANOUT_REDIS_URL: starts the embedded server, reuses it, and
    the second run upserts the same rows."""
    home = tmp_path / "home"
    env = {"FANOUT_HOME": str(home), "FANOUT_REDIS_URL": "",
           "FANOUT_SINK_URL": f"sqlite:///{home / 'demo.db'}"}
    args = ["demo", "--accounts", "2", "--services", "3", "--days", "4", "--latency-ms", "0",
            "--json"]
    try:
        first = fanout(*args, env=env)
        assert first.returncode == 0, first.stderr
        # The banner's sink URL works pasted back into FANOUT_SINK_URL (four slashes).
        assert f" · sink sqlite:///{home / 'demo.db'}\n" in first.stderr
        url_file = home / "redis.url"
        embedded_url = url_file.read_text().strip()
        second = fanout(*args, env=env)
        assert second.returncode == 0, second.stderr
        assert url_file.read_text().strip() == embedded_url  # reused, not restarted
        runs = [json.loads(r.stdout.strip().splitlines()[-1]) for r in (first, second)]
        for summary in runs:
            assert summary["status"] == "succeeded"
            assert summary["rows_written"] == 24
            assert summary["stages"]["metric_day"]["succeeded"] == 24
        assert runs[0]["run_id"] != runs[1]["run_id"]
        with sqlite3.connect(home / "demo.db") as conn:
            assert conn.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 24
            owners = conn.execute("SELECT DISTINCT run_id FROM metrics").fetchall()
        assert owners == [(runs[1]["run_id"],)]
        assert (home / "redis" / "appendonlydir").is_dir()  # append-only persistence is on
    finally:
        down = fanout("down", env=env)
    assert down.returncode == 0
    assert "stopped" in down.stdout
    assert not (home / "redis.url").exists()


def test_down_shuts_the_workers_down_before_their_redis(
    tmp_path: Path, start_worker: WorkerFactory
) -> None:
    home = tmp_path / "embedded"
    env = {"FANOUT_HOME": str(home), "FANOUT_REDIS_URL": ""}
    try:
        assert fanout("dead-letters", env=env).returncode == 0  # starts the embedded Redis
        url = (home / "redis.url").read_text().strip()
        worker = start_worker({"FANOUT_REDIS_URL": url})
        log = tmp_path / "worker0.log"
        wait_for(lambda: " ready." in log.read_text(), what="the worker ready")
    finally:
        down = fanout("down", env=env)
    assert down.returncode == 0, down.stderr
    assert down.stdout.splitlines() == ["asked 1 workers to shut down", "embedded Redis stopped"]
    assert worker.wait(timeout=20) == 0  # a warm shutdown, before Redis went away
    assert "Cannot connect" not in log.read_text()


def test_flower_replaces_the_fanout_process(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "producers.cli", "flower", "--port", str(port)],
        env={**os.environ, "FLOWER_BASIC_AUTH": "a:b"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        wait_for(lambda: b"producers.flower" in cmdline.read_bytes(),
                 what="the same process running Flower")
        # Answering means its event loop runs: a SIGTERM that lands earlier, between Flower
        # starting its events thread and marking itself started, leaves that thread running
        # and the process hanging (Flower's own start-up race, seen on a loaded machine).
        wait_for(lambda: answers(port), what="Flower answering")
    finally:
        proc.send_signal(signal.SIGTERM)
        # It is Flower (same pid): the signal reached Flower's own SIGTERM handler, which
        # exits 0, and no process is left behind serving the port.
        assert proc.wait(timeout=60) == 0
    assert not listening(port)


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def answers(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=10)
    except httpx.TransportError:
        return False
    return True


def blpop_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_blpop", {}).get("calls", 0))


def test_status_lists_recent_runs_and_watches_a_live_one(
    vendor: VendorHandle, start_worker: WorkerFactory, redis_client: redis.Redis
) -> None:
    vendor.configure(accounts=2, services=3)
    live = fanout("run", "demo", "--days", "4", "--end-day", "2026-01-31",
                  "--vendor-url", vendor.url, "-p", "http_retries=0")
    run_id = live.stdout.strip()
    # No worker yet, so the run is live for as long as the watcher needs to start: it looks
    # at the run (a BLPOP on its done list, then a snapshot, then the next BLPOP) before the
    # worker that ends it is started.
    waits_before = blpop_calls(redis_client)
    watcher = subprocess.Popen(
        [sys.executable, "-m", "producers.cli", "status", run_id, "--watch", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
    )
    try:
        wait_for(lambda: blpop_calls(redis_client) >= waits_before + 2,
                 what="the watcher's first look at the live run")
        assert watcher.poll() is None
        start_worker(concurrency=2)
        out, err = watcher.communicate(timeout=120)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["run_id"], summary["status"], summary["rows_written"]) == \
        (run_id, "succeeded", 24)
    assert "metric_day" in err  # the live bars, per stage

    listed = json.loads(fanout("status", "--json").stdout)
    newest = listed[0]
    assert (newest["run_id"], newest["pipeline"], newest["status"]) == \
        (run_id, "demo", "succeeded")
    assert newest["done"] == newest["enqueued"] == 2 + 6 + 24


def test_failures_tell_http_retries_only_where_there_were_some() -> None:
    # A try is counted per attempt, or per HTTP call when an attempt made several.
    assert describe_attempts({"attempts": 4, "tries": 4}) == "attempts 4"
    assert describe_attempts({"attempts": 1}) == "attempts 1"  # recorded before tries were
    assert describe_attempts({"attempts": 2, "tries": 6}) == \
        "attempts 2, 6 tries counting HTTP retries"


@pytest.mark.parametrize("url", ["sqlite:////tmp/x/fanout.db", "sqlite:///fanout.db",
                                 "postgresql:///db?host=/run/pg"])
def test_a_url_without_a_password_is_shown_as_given(url: str) -> None:
    assert redact(url) == url
