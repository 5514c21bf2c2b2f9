"""Signals as operators send them, to real processes: ``fanout worker``, ``fanout demo`` and
``fanout run --wait``, each for SIGINT (a terminal's Ctrl-C: the whole process group) and
SIGTERM (``timeout``, systemd, a CI cancel: the PID alone).

Every command is started with a tag in its environment, which its children inherit: after
it is gone no process on the machine may carry the tag (none left behind, whoever adopted it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import VendorHandle, WorkerFactory, sink_rows, wait_for

from producers import processes
from producers.supervisor import Supervisor, restart_delay_s
from producers.trigger import start_run
from workers.engine.services import services
from workers.ledger import RunSnapshot

_TAG = "FANOUT_SIGNALS_TEST_TAG"
_started_tags: list[str] = []

SIGNALS = [
    pytest.param(signal.SIGINT, id="SIGINT-ctrl-c"),
    pytest.param(signal.SIGTERM, id="SIGTERM"),
]


@dataclass
class Started:
    """A ``fanout`` command started as a user starts it, its output in two files."""

    proc: subprocess.Popen[bytes]
    tag: str
    out: Path
    err: Path

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def send(self, signum: int) -> None:
        """SIGINT as a terminal sends it (to the whole foreground process group); any other
        signal to the PID alone."""
        if signum == signal.SIGINT:
            os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)


def start_fanout(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Started:
    tag = uuid.uuid4().hex
    _started_tags.append(tag)
    n = len(list(tmp_path.glob("fanout*.out")))
    out, err = tmp_path / f"fanout{n}.out", tmp_path / f"fanout{n}.err"
    with open(out, "wb") as out_file, open(err, "wb") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "producers.cli", *args],
            stdout=out_file, stderr=err_file, start_new_session=True,
            env={**os.environ, _TAG: tag, **(env or {})},
        )
    return Started(proc, tag, out, err)


def _status_field(pid: int, field: str) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _alive(pid: int) -> bool:
    """Running, not a zombie (a zombie is dead; init reaps it)."""
    state = _status_field(pid, "State")
    return state is not None and not state.startswith("Z")


def tagged(tag: str) -> list[int]:
    """The live processes whose environment carries ``tag``."""
    needle = f"{_TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def children(pid: int) -> list[int]:
    """The live children of ``pid``, from /proc/PID/task/*/children."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return sorted(p for p in found if _alive(p))


def descendants(pid: int) -> list[int]:
    below = children(pid)
    return below + [d for child in below for d in descendants(child)]


@pytest.fixture(autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    """Whatever a test asserts, no process it started outlives it."""
    yield
    while _started_tags:
        for pid in tagged(_started_tags.pop()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def assert_all_gone(started: Started, pids: list[int]) -> None:
    """``pids`` (the command's descendants, listed before the signal) are gone, and nothing
    else carries its tag (an exiting process may show no environment: hence both)."""
    assert [pid for pid in pids if _alive(pid)] == []
    assert tagged(started.tag) == []


def ready_count(text: str) -> int:
    return len(re.findall(r"@\S+ ready\.", text))


def host() -> str:
    return socket.gethostname()


def supervisor_lines(started: Started) -> list[str]:
    return [ln for ln in started.stderr().splitlines() if ln.startswith("fanout worker:")]


def start_supervised_workers(tmp_path: Path, processes: int) -> Started:
    """``fanout worker --processes N``, once each of its N children said it is ready."""
    started = start_fanout(tmp_path, "worker", "--processes", str(processes),
                           "--concurrency", "2", "--loglevel", "INFO")
    wait_for(lambda: ready_count(started.stderr()) == processes,
             what=f"{processes} workers ready")
    assert len(children(started.proc.pid)) == processes
    return started


@pytest.mark.parametrize("signum", SIGNALS)
def test_worker_shuts_down_warmly_on_one_signal(tmp_path: Path, signum: signal.Signals) -> None:
    started = start_supervised_workers(tmp_path, 2)
    everything = descendants(started.proc.pid)
    started.send(signum)
    assert started.proc.wait(timeout=60) == 0
    assert supervisor_lines(started) == [
        f"fanout worker: {signum.name}: warm shutdown of 2 worker processes (they finish "
        f"their tasks; {signum.name} again stops them at once)"
    ]
    said = started.stdout() + started.stderr()
    assert said.count("worker: Warm shutdown") == 2  # one SIGTERM each...
    assert "Ctrl+C again" not in said  # ... and no SIGINT from the terminal on top
    assert_all_gone(started, everything)


def test_sigkill_of_the_worker_supervisor_takes_its_children_down(tmp_path: Path) -> None:
    started = start_supervised_workers(tmp_path, 2)
    everything = descendants(started.proc.pid)
    started.proc.kill()
    started.proc.wait(timeout=10)
    # The parent-death signal: a warm shutdown of idle workers, seconds.
    wait_for(lambda: not tagged(started.tag) and not any(map(_alive, everything)),
             timeout_s=30, what="the orphaned workers gone")


def test_a_worker_killed_by_hand_is_restarted_and_takes_work(
    tmp_path: Path, vendor: VendorHandle, sink_path: Path
) -> None:
    started = start_supervised_workers(tmp_path, 1)
    [first] = children(started.proc.pid)
    os.kill(first, signal.SIGKILL)
    name = f"fanout1-{started.proc.pid}@{host()}"
    wait_for(lambda: supervisor_lines(started), what="the supervisor's line")
    [line] = supervisor_lines(started)
    assert re.fullmatch(rf"fanout worker: {re.escape(name)} \(pid {first}\) died \(killed by "
                        r"SIGKILL\) after \d+ s up; restarting it in 1 s", line), line
    wait_for(lambda: ready_count(started.stderr()) == 2, what="the restarted worker ready")
    [second] = children(started.proc.pid)
    assert second != first
    run_id = start_run("demo", {"days": 2, "end_day": "2026-01-31", "vendor_url": vendor.url})
    assert services().ledger.view.wait(run_id, timeout_s=60) == "succeeded"
    assert len(sink_rows(sink_path)) == 2 * 3 * 2  # the only worker is the restarted one
    assert len(supervisor_lines(started)) == 1


def _snapshot(run_id: str) -> RunSnapshot:
    snap = services().ledger.view.snapshot(run_id)
    assert snap is not None
    return snap


def _leaves_done(run_id: str) -> int:
    counts = _snapshot(run_id).stages.get("metric_day", {})
    return sum(counts.get(c, 0) for c in ("succeeded", "failed", "cached", "skipped"))


# 8 calls in flight: 180 leaves take 4.5 s at 200 ms, so the signal lands mid-run (at the
# default 1,000 every leaf was in flight at once, and a fresh-clone run saw them all done
# before the signal).
_DEMO_ARGS = ("demo", "--accounts", "2", "--services", "3", "--days", "30",
              "--latency-ms", "200", "--processes", "1", "--concurrency", "2",
              "--max-in-flight", "8")


@pytest.mark.parametrize(("signum", "as_json"), [
    pytest.param(signal.SIGINT, False, id="SIGINT-ctrl-c"),
    pytest.param(signal.SIGTERM, True, id="SIGTERM-json"),
])
def test_demo_cancels_its_run_and_stops_everything_on_a_signal(
    tmp_path: Path, signum: signal.Signals, as_json: bool
) -> None:
    started = start_fanout(tmp_path, *_DEMO_ARGS, *(["--json"] if as_json else []))
    shown = started.stderr if as_json else started.stdout  # --json: the console on stderr
    match = wait_for(lambda: re.search(r"^run (\S+): ", shown(), re.M), what="the demo's run")
    run_id = match.group(1)
    wait_for(lambda: _leaves_done(run_id) > 0, what="the first leaves")  # work in flight
    everything = descendants(started.proc.pid)
    assert len(everything) == 2  # the vendor and one worker
    started.send(signum)
    # SIGTERM to all, SIGKILL after a 3 s grace: not 20 s per process in turn.
    assert started.proc.wait(timeout=30) == 128 + signum
    line = (f"fanout demo: interrupted ({signum.name}): run {run_id} cancelled, workers and "
            "vendor stopped")
    if as_json:
        assert started.stderr().splitlines()[-1] == line
        [last] = started.stdout().splitlines()
        summary = json.loads(last)
        assert (summary["run_id"], summary["status"]) == (run_id, "cancelled")
        assert summary["error"] == f"fanout demo interrupted ({signum.name})"
    else:
        assert started.stderr().splitlines() == [line]
    snap = _snapshot(run_id)
    assert snap.status == "cancelled"
    assert snap.stop_reason == f"fanout demo interrupted ({signum.name})"
    assert _leaves_done(run_id) < 2 * 3 * 30
    assert_all_gone(started, everything)


def test_demo_refuses_to_start_beside_a_worker_it_did_not_start(
    tmp_path: Path, start_worker: WorkerFactory, sink_path: Path, redis_url: str
) -> None:
    start_worker(ready=True)  # named test0-PID@host, on the session's Redis
    started = start_fanout(tmp_path, "demo", "--accounts", "1", "--services", "1", "--days",
                           "1", "--latency-ms", "0", "--processes", "1")
    assert started.proc.wait(timeout=60) == 2
    assert started.stderr().splitlines() == [
        f"fanout: error: a worker not started by this demo is consuming from {redis_url} "
        f"(test0-{os.getpid()}@{host()}); stop it (fanout down) or point FANOUT_REDIS_URL "
        "elsewhere"
    ]
    assert services().ledger.view.recent_runs() == []  # no run started
    assert sink_rows(sink_path) == []
    assert tagged(started.tag) == []  # its vendor stopped


@pytest.mark.parametrize("signum", SIGNALS)
def test_run_wait_stops_waiting_not_the_run(
    tmp_path: Path, signum: signal.Signals, vendor: VendorHandle,
    start_worker: WorkerFactory, sink_path: Path
) -> None:
    vendor.configure(latency_ms=200)
    start_worker(concurrency=2, ready=True)
    started = start_fanout(tmp_path, "run", "demo", "--days", "3", "--end-day", "2026-01-31",
                           "--vendor-url", vendor.url, "--wait", "--json")
    match = wait_for(lambda: re.search(r"^run (\S+) started$", started.stderr(), re.M),
                     what="the run started")
    run_id = match.group(1)
    started.send(signum)
    assert started.proc.wait(timeout=30) == 128 + signum
    assert started.stderr().splitlines() == [
        f"run {run_id} started",
        f"fanout: stopped waiting ({signum.name}): run {run_id} goes on in the workers; "
        f"watch it with: fanout status {run_id} --watch",
    ]
    assert tagged(started.tag) == []
    summary = json.loads(started.stdout().splitlines()[-1])  # the JSON still comes last
    assert (summary["run_id"], summary["status"]) == (run_id, "running")
    assert summary["error"] == (f"stopped waiting ({signum.name}): the run goes on in the "
                                "workers")
    assert _snapshot(run_id).status == "running"  # not cancelled: it goes on
    assert services().ledger.view.wait(run_id, timeout_s=60) == "succeeded"
    assert len(sink_rows(sink_path)) == 2 * 3 * 3


def test_down_stops_supervised_workers_for_good(tmp_path: Path) -> None:
    """`fanout down` broadcasts a shutdown: the supervisor's children exit 0, which it takes
    as asked for (no restart), and it exits 0 before the embedded Redis goes."""
    home = tmp_path / "embedded"
    env = {"FANOUT_HOME": str(home), "FANOUT_REDIS_URL": ""}
    down_args = [sys.executable, "-m", "producers.cli", "down"]
    try:
        first = subprocess.run([sys.executable, "-m", "producers.cli", "dead-letters"],
                               env={**os.environ, **env}, capture_output=True, timeout=60)
        assert first.returncode == 0, first.stderr  # it started the embedded Redis
        url = (home / "redis.url").read_text().strip()
        started = start_fanout(tmp_path, "worker", "--processes", "2", "--concurrency", "2",
                               "--loglevel", "INFO", env={**env, "FANOUT_REDIS_URL": url})
        wait_for(lambda: ready_count(started.stderr()) == 2, what="2 workers ready")
        everything = descendants(started.proc.pid)
    finally:
        down = subprocess.run(down_args, env={**os.environ, **env}, capture_output=True,
                              text=True, timeout=60)
    assert down.stdout.splitlines() == ["asked 2 workers to shut down", "embedded Redis stopped"]
    assert started.proc.wait(timeout=30) == 0
    lines = supervisor_lines(started)
    assert len(lines) == 2
    for line in lines:
        assert re.fullmatch(r"fanout worker: fanout\d-\d+@\S+ \(pid \d+\) shut down \(exit "
                            r"code 0: it was asked to\): not restarted", line), line
    assert_all_gone(started, everything)


def test_sigkill_of_the_demo_leaves_nothing_behind(tmp_path: Path) -> None:
    started = start_fanout(tmp_path, *_DEMO_ARGS)
    match = wait_for(lambda: re.search(r"^run (\S+): ", started.stdout(), re.M),
                     what="the demo's run")
    wait_for(lambda: _leaves_done(match.group(1)) > 0, what="the first leaves")
    everything = descendants(started.proc.pid)
    assert len(everything) == 2  # the vendor and one worker
    started.proc.kill()
    started.proc.wait(timeout=10)
    # The parent-death signals: SIGTERM for the vendor, SIGKILL for the worker.
    wait_for(lambda: not tagged(started.tag) and not any(map(_alive, everything)),
             timeout_s=30, what="the demo's vendor and worker gone")


def test_restart_delays_double_up_to_a_cap() -> None:
    assert [restart_delay_s(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_child_that_keeps_dying_is_restarted_later_each_time(tmp_path: Path) -> None:
    """A real child that fails three times (exit 3, SIGKILL, exit 4 after staying up past
    ``stable_after_s``) and then exits 0: one line per death with the delay, 1 s, 2 s, then
    1 s again (it had been up a while), and no restart after exit 0."""
    tries = tmp_path / "tries"
    script = (
        "import os, pathlib, signal, sys, time\n"
        f"p = pathlib.Path({str(tries)!r}); n = len(p.read_text()) if p.exists() else 0\n"
        "p.write_text('x' * (n + 1))\n"
        "if n == 0: sys.exit(3)\n"
        "if n == 1: os.kill(os.getpid(), signal.SIGKILL)\n"
        "if n == 2: time.sleep(3.0); sys.exit(4)\n"
    )
    lines: list[str] = []
    supervisor = Supervisor({"flaky@here": [sys.executable, "-c", script]}, os.environ,
                            say=lines.append, stable_after_s=2.0)
    assert supervisor.run() == 0
    assert tries.read_text() == "xxxx"
    unpinned = [re.sub(r"after \d+ s", "after T s", re.sub(r"pid \d+", "pid N", line))
                for line in lines]
    assert unpinned == [
        "fanout worker: flaky@here (pid N) died (exit code 3) after T s up; restarting it in 1 s",
        "fanout worker: flaky@here (pid N) died (killed by SIGKILL) after T s up; restarting "
        "it in 2 s",
        "fanout worker: flaky@here (pid N) died (exit code 4) after T s up; restarting it in 1 s",
        "fanout worker: flaky@here (pid N) shut down (exit code 0: it was asked to): not "
        "restarted",
    ]


def test_a_second_ctrl_c_kills_workers_busy_in_their_warm_shutdown(tmp_path: Path) -> None:
    # A vendor of its own: the stalled call outlives the test, and must not show in the
    # session vendor's in-flight count.
    stalling = VendorHandle(processes.start_vendor(["--accounts", "1", "--services", "1"]))
    try:
        [account] = stalling.http.get("/accounts").json()["accounts"]
        # The account's services call stalls past the test: its task stays in flight.
        stalling.configure(stall_paths=[f"/accounts/{account['id']}/services"],
                           stall_ms=600_000)
        started = start_supervised_workers(tmp_path, 1)
        everything = descendants(started.proc.pid)
        start_run("demo", {"days": 1, "end_day": "2026-01-31", "vendor_url": stalling.url})
        wait_for(lambda: stalling.stats()["in_flight"] > 0, what="a call in flight")
        started.send(signal.SIGINT)
        wait_for(lambda: "worker: Warm shutdown" in started.stdout(), what="the warm shutdown")
        started.send(signal.SIGINT)
        assert started.proc.wait(timeout=30) == 1
    finally:
        stalling.vendor.stop()
    name = f"fanout1-{started.proc.pid}@{host()}"
    assert supervisor_lines(started) == [
        "fanout worker: SIGINT: warm shutdown of 1 worker processes (they finish their tasks; "
        "SIGINT again stops them at once)",
        "fanout worker: second SIGINT: killing the worker processes (SIGKILL); the messages "
        "they had not finished come back after the visibility timeout",
        f"fanout worker: {name} (pid {everything[0]}) ended in the shutdown: killed by SIGKILL",
    ]
    assert_all_gone(started, everything)
