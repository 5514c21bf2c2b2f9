"""The benchmark's private world: its own Redis, the demo vendor, a temp dir, child processes.

``BenchEnv.start()`` sets ``FANOUT_REDIS_URL`` (and ``FANOUT_HOME``, ``FANOUT_SINK_URL``) before
anything from ``workers`` is imported, so the Celery app, the ledger and every worker started
later talk to this Redis and never to the embedded server under ``.fanout/``.

Process measurement reads ``/proc``: RSS (``VmRSS``) and CPU time (utime + stime) of a process
and all its descendants, so a prefork pool or Dramatiq's forked workers count in full.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx
import redis

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    """Same as ``workers.embedded_redis.free_port``; duplicated because the port must be in
    ``FANOUT_REDIS_URL`` before the first import from ``workers``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- /proc measurement ------------------------------------------------------------------------


def _parent_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant."""
    children = _parent_map()
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def _rss_one(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_one(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command: state(0) ppid(1) ... utime(11) stime(12).
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_bytes(pids: Iterable[int], *, include_children: bool = True) -> int:
    """Resident memory of the processes (and their descendants), in bytes."""
    total = 0
    for pid in pids:
        tree = process_tree(pid) if include_children else [pid]
        total += sum(_rss_one(p) for p in tree)
    return total


def cpu_seconds(pids: Iterable[int], *, include_children: bool = True) -> float:
    """CPU time (user + system) used so far by the processes and their live descendants."""
    total = 0.0
    for pid in pids:
        tree = process_tree(pid) if include_children else [pid]
        total += sum(_cpu_one(p) for p in tree)
    return total


def machine_cpu_seconds() -> dict[str, float]:
    """Machine-wide CPU seconds so far from /proc/stat: ``busy`` (user, nice, system, irq,
    softirq) and ``steal`` (time the hypervisor gave to other guests)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return {
        "busy": (user + nice + system + irq + softirq) / _CLK_TCK,
        "steal": steal / _CLK_TCK,
    }


# -- the demo vendor ----------------------------------------------------------------------------


class VendorHandle:
    """The demo vendor subprocess and its admin endpoints."""

    def __init__(self, options: Sequence[str]) -> None:
        from producers.processes import start_vendor

        self.options = list(options)
        self._vendor = start_vendor(self.options)
        self.url = self._vendor.url
        self.pid = self._vendor.process.pid
        self._http = httpx.Client(base_url=self.url, timeout=30)

    def configure(self, **knobs: Any) -> dict[str, Any]:
        response = self._http.post("/_admin/config", json=knobs)
        response.raise_for_status()
        return dict(response.json())

    def reset(self) -> None:
        self._http.post("/_admin/reset").raise_for_status()

    def stats(self) -> dict[str, Any]:
        response = self._http.get("/_admin/stats")
        response.raise_for_status()
        return dict(response.json())

    def metric_requests(self) -> int:
        return int(self.stats()["by_endpoint"]["metrics"])

    def stop(self) -> None:
        self._http.close()
        self._vendor.stop()


# -- the environment ----------------------------------------------------------------------------


class BenchEnv:
    """Private Redis + demo vendor + temp dir; tracks child processes and cleans up on exit."""

    def __init__(self, latency_ms: float, *, keep_tmp: bool = False) -> None:
        self.latency_ms = latency_ms
        self.keep_tmp = keep_tmp
        self.tmp = Path(tempfile.mkdtemp(prefix="fanout-bench-"))
        self.redis_url = ""
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.vendor: VendorHandle | None = None
        self._procs: list[subprocess.Popen[Any]] = []
        self._client: redis.Redis | None = None
        self._closed = False

    # lifecycle

    def start(self) -> BenchEnv:
        port = _free_port()
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        os.environ["FANOUT_REDIS_URL"] = self.redis_url
        os.environ.pop("FANOUT_BROKER_URL", None)
        os.environ["FANOUT_HOME"] = str(self.tmp / "home")
        os.environ["FANOUT_SINK_URL"] = f"sqlite:///{self.tmp / 'driver-sink.db'}"
        # Worker processes import ``benchmarks.*`` and the project from here.
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        atexit.register(self.close)

        from workers import embedded_redis  # only now: FANOUT_REDIS_URL is set

        self.redis_proc = embedded_redis.start_server(
            self.tmp / "redis", port, appendonly=False, daemonize=False
        )
        embedded_redis.wait_ready(self.redis_url)
        self.vendor = VendorHandle(["--latency-ms", str(self.latency_ms)])
        return self

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.stop_processes(self._procs, timeout_s=10)
        if self.vendor is not None:
            self.vendor.stop()
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.terminate()
            try:
                self.redis_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.redis_proc.kill()
        if not self.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # Redis

    @property
    def redis(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        return self._client

    def flush(self) -> None:
        """A fresh Redis for the next suite (never while benchmark workers are running)."""
        self.redis.flushall()

    def used_memory(self) -> int:
        return int(self.redis.info("memory")["used_memory"])

    def server_version(self) -> str:
        info = self.redis.info("server")
        name = "valkey" if "valkey_version" in info else "redis"
        return f"{name} {info.get('valkey_version') or info.get('redis_version')}"

    @property
    def redis_pid(self) -> int:
        assert self.redis_proc is not None
        return self.redis_proc.pid

    @property
    def vendor_handle(self) -> VendorHandle:
        assert self.vendor is not None
        return self.vendor

    # child processes

    def suite_dir(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def worker_env(self, suite_dir: Path) -> dict[str, str]:
        """What every worker process gets (on top of this process's environment)."""
        return {
            "FANOUT_REDIS_URL": self.redis_url,
            "FANOUT_SINK_URL": f"sqlite:///{suite_dir / 'sink.db'}",
            "FANOUT_HOME": str(suite_dir / "home"),
            "BENCH_BASELINE_SINK": str(suite_dir / "baseline-sink.db"),
            "PYTHONPATH": os.environ["PYTHONPATH"],
        }

    def track(self, proc: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
        self._procs.append(proc)
        return proc

    def spawn(
        self, cmd: Sequence[str], env: dict[str, str], log_path: Path
    ) -> subprocess.Popen[bytes]:
        """Start a process in its own session, output to ``log_path``."""
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                list(cmd),
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=PROJECT_ROOT,
            )
        return self.track(proc)

    def stop_processes(
        self, procs: Sequence[subprocess.Popen[Any]], timeout_s: float = 30
    ) -> None:
        """Warm shutdown (SIGTERM) of all at once, then SIGKILL the groups of any that hang."""
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # Whatever is left in its session (a pool child) goes with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in procs:
            if proc in self._procs:
                self._procs.remove(proc)


def python() -> str:
    return sys.executable
