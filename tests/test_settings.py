"""Settings are checked once, where a process starts: a bad FANOUT_* value is one line on
stderr naming the variable and exit code 2, for every ``fanout`` command and for a plain
``celery -A workers worker``, before anything connects to Redis or starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BAD_VALUES: list[tuple[str, str, str]] = [  # (variable, value, what the line says)
    ("FANOUT_HTTP_TIMEOUT_S", "0", "FANOUT_HTTP_TIMEOUT_S must be > 0, got '0'"),
    ("FANOUT_HTTP_TIMEOUT_S", "-1", "FANOUT_HTTP_TIMEOUT_S must be > 0, got '-1'"),
    ("FANOUT_HTTP_TIMEOUT_S", "soon", "FANOUT_HTTP_TIMEOUT_S must be a number, got 'soon'"),
    ("FANOUT_HTTP_TIMEOUT_S", "inf", "FANOUT_HTTP_TIMEOUT_S must be a finite number, got 'inf'"),
    ("FANOUT_HTTP_TIMEOUT_S", "nan", "FANOUT_HTTP_TIMEOUT_S must be a finite number, got 'nan'"),
    ("FANOUT_LIMIT_LEASE_S", "0", "FANOUT_LIMIT_LEASE_S must be > 0, got '0'"),
    ("FANOUT_OUTAGE_LIMIT_S", "-5", "FANOUT_OUTAGE_LIMIT_S must be >= 0, got '-5'"),
    ("FANOUT_SCHEDULE_GRACE_S", "-3", "FANOUT_SCHEDULE_GRACE_S must be >= 0, got -3"),
    ("FANOUT_SCHEDULE_LEASE_S", "0", "FANOUT_SCHEDULE_LEASE_S must be >= 1, got 0"),
    ("FANOUT_VISIBILITY_TIMEOUT_S", "0", "FANOUT_VISIBILITY_TIMEOUT_S must be >= 1, got 0"),
    ("FANOUT_LEDGER_TTL_S", "10", "FANOUT_LEDGER_TTL_S must be >= 60, got 10"),
    ("FANOUT_PREFETCH_MULTIPLIER", "0", "FANOUT_PREFETCH_MULTIPLIER must be >= 1, got 0"),
    ("FANOUT_TASK_EVENTS", "yes", "FANOUT_TASK_EVENTS must be 0 or 1, got 'yes'"),
    ("FANOUT_REDIS_URL", "http://127.0.0.1:6379",
     "FANOUT_REDIS_URL must start with redis:// or rediss:// or unix://, got "
     "'http://127.0.0.1:6379'"),
    ("FANOUT_BROKER_URL", "localhost:6379",
     "FANOUT_BROKER_URL must start with SCHEME://, got 'localhost:6379'"),
    ("FANOUT_SINK_URL", "mysql://u:secret@db/x", "unsupported FANOUT_SINK_URL 'mysql://u:***@db/x'"),
    ("FANOUT_PIPELINES", "my-pipelines", "FANOUT_PIPELINES must be module names separated by "
     "commas, got 'my-pipelines'"),
    ("FANOUT_CONFIG", "/nonexistent/fanout.toml",
     "FANOUT_CONFIG: no such file '/nonexistent/fanout.toml'"),
    ("FANOUT_DEMO_VENDOR_URL", "127.0.0.1:8080",
     "FANOUT_DEMO_VENDOR_URL must start with http:// or https://, got '127.0.0.1:8080'"),
    ("FANOUT_HOME", "/proc/nope", "FANOUT_HOME '/proc/nope' cannot be created or written: "),
]
#: The ones the worker reads itself (the rest belong to producers or the config file).
WORKER_READS = {"FANOUT_HTTP_TIMEOUT_S", "FANOUT_LIMIT_LEASE_S", "FANOUT_VISIBILITY_TIMEOUT_S",
                "FANOUT_TASK_EVENTS", "FANOUT_HOME", "FANOUT_PREFETCH_MULTIPLIER"}
COMMANDS = [["status"], ["run", "demo", "--days", "1"], ["worker"], ["beat"], ["dead-letters"],
            ["limits", "list"], ["failures", "some-run"], ["down"]]


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def assert_one_line(result: subprocess.CompletedProcess[str], says: str, exit_code: int = 2,
                    ) -> None:
    assert result.returncode == exit_code, result
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("fanout: error: "), result.stderr
    assert says in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(("name", "value", "says"), BAD_VALUES,
                         ids=[f"{n}={v}" for n, v, _ in BAD_VALUES])
def test_a_bad_setting_is_one_line_and_exit_2(name: str, value: str, says: str) -> None:
    assert_one_line(run(["-m", "producers.cli", "status"], {name: value}), says)


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_command_checks_the_settings_first(command: list[str]) -> None:
    result = run(["-m", "producers.cli", *command], {"FANOUT_HTTP_TIMEOUT_S": "0"})
    assert_one_line(result, "FANOUT_HTTP_TIMEOUT_S must be > 0, got '0'")


@pytest.mark.parametrize(("name", "value", "says"),
                         [bad for bad in BAD_VALUES if bad[0] in WORKER_READS],
                         ids=[f"{n}={v}" for n, v, _ in BAD_VALUES if n in WORKER_READS])
def test_a_plain_celery_worker_refuses_a_bad_setting_in_one_line(
    name: str, value: str, says: str
) -> None:
    result = run(["-m", "celery", "-A", "workers", "worker", "--pool", "threads"], {name: value})
    assert_one_line(result, says)


def test_a_home_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.write_text("not a directory")
    result = run(["-m", "producers.cli", "status"], {"FANOUT_HOME": str(home)})
    assert_one_line(result, f"FANOUT_HOME {str(home)!r} cannot be created or written: ")
