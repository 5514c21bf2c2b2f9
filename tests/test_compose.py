"""compose.yaml: well-formed, and each service's command runs natively (Docker cannot run
here), with the test Redis in place of the redis service and free ports."""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import require_service, wait_for

from workers.embedded_redis import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]


def test_compose_file_is_well_formed() -> None:
    assert set(SERVICES) == {"redis", "postgres", "vendor", "worker", "flower", "beat",
                             "producer"}
    for name, service in SERVICES.items():
        assert "image" in service or "build" in service, name
        command = service["command"]
        assert isinstance(command, list) and all(isinstance(a, str) for a in command), name
        for dependency in service.get("depends_on", {}):
            assert dependency in SERVICES, (name, dependency)
        for mapping in service.get("ports", []):
            _, host, container = published(mapping)
            assert int(host) > 0 and int(container) > 0
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]  # a named volume, or a file of this repository
            assert source in COMPOSE["volumes"] or (ROOT / source).is_file(), (name, volume)
        if name not in ("redis", "postgres"):  # the stores run their own images
            assert command[0] == "fanout", name
            assert service["environment"]["FANOUT_REDIS_URL"] == "redis://redis:6379/0"
    # PostgreSQL is opt-in (a profile), and the fanout services can be pointed at it.
    assert SERVICES["postgres"]["profiles"] == ["postgres"]
    assert "FANOUT_SINK_URL:-sqlite" in (ROOT / "compose.yaml").read_text()
    redis_command = SERVICES["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert redis_command[redis_command.index("--maxmemory-policy") + 1] == "noeviction"
    assert (ROOT / SERVICES["worker"]["build"] / "Dockerfile").exists()
    assert SERVICES["beat"]["deploy"]["replicas"] == 2  # two beats: each slot runs once
    assert beat_config().is_file()


def published(mapping: str) -> tuple[str, str, str]:
    """A short ``ports`` entry as (host address, host port, container port); no address is
    every interface."""
    parts = mapping.rsplit(":", 2)
    return ("0.0.0.0", *parts) if len(parts) == 2 else (parts[0], parts[1], parts[2])


#: Published with no login of their own, each for a reason.
NO_LOGIN_NEEDED = {"vendor": "the demo vendor: made-up data, no secret"}
#: Environment variables that hold a secret, by their name.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH|_KEY$")
#: A secret from the environment: ${VAR}, ${VAR:?why} or ${VAR:-} (empty), no default value.
FROM_ENVIRONMENT = re.compile(r"^\$\{\w+(:\?[^}]*|:-|)\}$")
#: Credentials written into a URL: scheme://user:password@host.
URL_PASSWORD = re.compile(r"://[^/:@\s]+:([^@\s]+)@")
#: Where each published service takes its login from (required: `fanout flower` refuses to
#: start beyond loopback without it, see the test below).
LOGIN = {"flower": "FLOWER_BASIC_AUTH"}


def open_doors(compose: dict[str, Any]) -> list[str]:
    """What in a compose file lets someone in without a secret the operator chose: a port
    published beyond loopback, a published service with no login from the environment, a
    secret written in the file (a literal, or a default that works out of the box)."""
    doors = []
    for name, service in compose["services"].items():
        environment = service.get("environment") or {}
        for key, value in environment.items():
            text = str(value)
            if SECRET_NAME.search(key) and not FROM_ENVIRONMENT.match(text):
                doors.append(f"{name}: {key} is written in the file ({text!r})")
            password = URL_PASSWORD.search(text)
            if password and not FROM_ENVIRONMENT.match(password[1]):
                doors.append(f"{name}: {key} has a password written in its URL")
        for mapping in service.get("ports", []):
            address, host, _ = published(mapping)
            if not ipaddress.ip_address(address.strip("[]")).is_loopback:
                doors.append(f"{name}: port {host} is published beyond loopback ({mapping})")
            if name not in NO_LOGIN_NEEDED and LOGIN.get(name) not in environment:
                doors.append(f"{name}: port {host} is published with no login")
    return doors


def test_compose_is_closed_by_default() -> None:
    assert open_doors(COMPOSE) == []
    # The doors the file had until it was closed (Flower's, the vendor's, PostgreSQL's) and
    # two other kinds, each found.
    was = copy.deepcopy(COMPOSE)
    was["services"]["flower"]["ports"] = ["5555:5555"]
    was["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"] = \
        "${FLOWER_BASIC_AUTH:-admin:change-me}"
    was["services"]["vendor"]["ports"] = ["8765:8765"]
    was["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] = "fanout"
    was["services"]["worker"]["environment"] = {
        **was["services"]["worker"]["environment"],
        "FANOUT_SINK_URL": "${FANOUT_SINK_URL:-postgresql://fanout:fanout@postgres/fanout}"}
    was["services"]["redis"]["ports"] = ["127.0.0.1:6379:6379"]
    assert open_doors(was) == [
        "redis: port 6379 is published with no login",
        "postgres: POSTGRES_PASSWORD is written in the file ('fanout')",
        "vendor: port 8765 is published beyond loopback (8765:8765)",
        "worker: FANOUT_SINK_URL has a password written in its URL",
        "flower: FLOWER_BASIC_AUTH is written in the file "
        "('${FLOWER_BASIC_AUTH:-admin:change-me}')",
        "flower: port 5555 is published beyond loopback (5555:5555)",
    ]


def test_compose_flower_refuses_to_start_without_its_login(tmp_path: Path) -> None:
    """What the flower service does when FLOWER_BASIC_AUTH is not set (compose gives it
    empty): one line, exit code 2, nothing served."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    env["FLOWER_BASIC_AUTH"] = ""
    result = subprocess.run(native("flower"), env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr == ("fanout: error: refusing to serve Flower on '0.0.0.0' without "
                             "FLOWER_BASIC_AUTH=user:password (its task view shows every "
                             "run's arguments)\n")


def beat_config(service: str = "beat") -> Path:
    """The config file compose mounts where the service's FANOUT_CONFIG points."""
    target = SERVICES[service]["environment"]["FANOUT_CONFIG"]
    for volume in SERVICES[service]["volumes"]:
        source, _, rest = volume.partition(":")
        if rest.split(":")[0] == target:
            return ROOT / source
    raise AssertionError(f"nothing mounted at {target}")


def native(service: str, **option_values: str) -> list[str]:
    """The service's command as run here: `fanout` from this checkout, options replaced."""
    command = list(SERVICES[service]["command"])
    for option, value in option_values.items():
        flag = "--" + option.replace("_", "-")
        command[command.index(flag) + 1] = value
    return [sys.executable, "-m", "producers.cli", *command[1:]]


@pytest.fixture
def compose_env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(SERVICES["worker"]["environment"])
    env.update({"FANOUT_REDIS_URL": redis_url, "FANOUT_HOME": str(tmp_path / "data"),
                "FANOUT_SINK_URL": f"sqlite:///{tmp_path / 'data' / 'fanout.db'}",
                "FANOUT_CONFIG": str(beat_config("worker"))})  # the file compose mounts
    return env


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def test_compose_service_commands_run_natively(
    compose_env: dict[str, str], started: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    def start(command: list[str], env: dict[str, str], log: str) -> subprocess.Popen[str]:
        out = open(tmp_path / log, "w")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        started.append(process)
        return process

    vendor_port = free_port()
    start(native("vendor", host="127.0.0.1", port=str(vendor_port)), compose_env, "vendor.log")
    vendor_url = f"http://127.0.0.1:{vendor_port}"

    def vendor_up() -> bool:
        try:
            return httpx.get(f"{vendor_url}/accounts").status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(vendor_up, what="the vendor service")
    assert len(httpx.get(f"{vendor_url}/accounts").json()["accounts"]) == 10

    start(native("worker"), compose_env, "worker.log")
    wait_for(lambda: " ready." in (tmp_path / "worker.log").read_text(), what="the worker")

    flower_port = free_port()
    flower_env = {**compose_env, "FLOWER_BASIC_AUTH": "admin:s3cret"}
    start(native("flower", port=str(flower_port), address="127.0.0.1"), flower_env, "flower.log")
    metrics = f"http://127.0.0.1:{flower_port}/metrics"

    def flower_up() -> bool:
        try:
            return httpx.get(metrics, auth=("admin", "s3cret")).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(flower_up, timeout_s=60, what="Flower")
    # Basic auth from the environment guards the UI, its API and /metrics alike.
    for path in ("/workers", "/api/workers", "/metrics"):
        page = f"http://127.0.0.1:{flower_port}{path}"
        assert httpx.get(page).status_code == 401, path
        assert httpx.get(page, auth=("admin", "s3cret")).status_code == 200, path
    assert "flower_" in httpx.get(metrics, auth=("admin", "s3cret")).text

    producer_env = {**compose_env, "FANOUT_DEMO_VENDOR_URL": vendor_url}
    beat_env = {**producer_env, "FANOUT_CONFIG": str(beat_config())}
    beat = start(native("beat"), beat_env, "beat.log")
    wait_for(lambda: "beat: schedule demo_daily" in (tmp_path / "beat.log").read_text(),
             what="the beat")
    # The schedule the beat runs, triggered now by hand: the demo over 10 x 50 services.
    manual = subprocess.run([sys.executable, "-m", "producers.cli", "schedules", "run",
                             "demo_daily", "--wait", "--json"], env=beat_env,
                            capture_output=True, text=True, timeout=300)
    assert manual.returncode == 0, manual.stderr
    assert json.loads(manual.stdout.strip().splitlines()[-1])["rows_written"] == 10 * 50
    assert beat.poll() is None, (tmp_path / "beat.log").read_text()

    producer = subprocess.run([*native("producer", days="2"), "--json"], env=producer_env,
                              capture_output=True, text=True, timeout=300)
    assert producer.returncode == 0, producer.stderr
    summary = json.loads(producer.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded"
    assert summary["rows_written"] == 10 * 50 * 2


def test_docker_compose_accepts_the_file() -> None:
    if shutil.which("docker-compose") is None:
        require_service("docker-compose (Debian's package) is not installed")
    result = subprocess.run(["docker-compose", "-f", str(ROOT / "compose.yaml"), "config", "-q"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
