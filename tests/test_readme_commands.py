"""Every command the README shows in a shell block runs, for real, against a live system: an
embedded or test Redis, the demo vendor, a worker, Flower and a beat started as the README
starts them. A command the README gains that no rule below knows fails the test, so the README
cannot drift from what the code does.

Each block is a terminal of its own, as a reader would follow it: what a block exports is
gone in the next, what it starts keeps running (the README's worker, Flower, beat). Without
``FANOUT_REDIS_URL`` a command uses the embedded Redis, under this test's ``FANOUT_HOME``. The
README's placeholders are replaced by what this machine has: ``my-redis`` by the test Redis,
ports by free ones, ``RUN_ID`` by the run the block made. A comment that is a value (``# 89``)
is the output the command must end with.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from conftest import wait_for

from workers import keys
from workers.embedded_redis import free_port
from workers.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FANOUT = str(Path(sys.executable).with_name("fanout"))
#: Commands that cannot run inside the test suite, each with the reason.
NOT_RUN = {"make test": "it runs this very suite"}


@dataclass
class Command:
    text: str  # as the README shows it, comment removed
    comment: str  # what follows `#`, if anything
    background: bool


def shell_blocks(text: str) -> list[list[Command]]:
    """The README's ```sh blocks, one Command a line."""
    blocks = []
    for match in re.finditer(r"```sh\n(.*?)```", text, re.S):
        commands = []
        for line in match.group(1).splitlines():
            code, _, comment = line.partition(" #")
            code = code.strip()
            if not code:
                continue
            background = code.endswith("&")
            commands.append(Command(code.rstrip("&").strip(), comment.strip(), background))
        blocks.append(commands)
    return blocks


def toml_block(text: str) -> str:
    """The README's config file example (the first ```toml block)."""
    match = re.search(r"```toml\n(.*?)```", text, re.S)
    assert match, "the README shows no config file"
    return match.group(1)


@dataclass
class LiveSystem:
    """What the README's commands start and share, and how to stop it."""

    tmp: Path
    base_env: dict[str, str]
    redis_url: str
    env: dict[str, str] = field(default_factory=dict)  # this block's terminal
    vendor_url: str = ""
    run_id: str = ""
    started: list[subprocess.Popen[str]] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)

    def run(self, argv: list[str], timeout_s: float = 300, **env: str) -> str:
        result = subprocess.run(argv, cwd=ROOT, env={**self.env, **env}, text=True,
                                capture_output=True, timeout=timeout_s)
        assert result.returncode == 0, (argv, result.returncode, result.stdout[-2000:],
                                        result.stderr[-2000:])
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        return result.stdout

    def start(self, argv: list[str], name: str, **env: str) -> Path:
        log = self.tmp / f"{name}.log"
        process = subprocess.Popen(argv, cwd=ROOT, env={**self.env, **env}, text=True,
                                   stdout=log.open("w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.started.append(process)
        return log

    def stop_all(self) -> list[int | None]:
        """SIGTERM each (a warm shutdown), as a user's Ctrl-C; their exit codes."""
        codes = []
        for process in reversed(self.started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
            try:
                codes.append(process.wait(60))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                codes.append(None)
        self.started.clear()
        return codes


def latest_run(client: redis.Redis) -> str:
    return str(client.zrange(keys.RUNS_INDEX, -1, -1)[0])


Rule = Callable[[LiveSystem, re.Match[str], Command], None]
RULES: list[tuple[str, Rule]] = []


def rule(pattern: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        RULES.append((pattern, fn))
        return fn
    return register


@rule(r"make demo(?: ARGS=\"(?P<args>[^\"]*)\")?")
def make_demo(live: LiveSystem, m: re.Match[str], cmd: Command) -> None:
    # As on a fresh clone: no FANOUT_REDIS_URL, so the embedded Redis (under FANOUT_HOME),
    # which it leaves running for the next run (fanout down stops it).
    env = live.env
    argv = ["make", "--no-print-directory", "demo"] + ([f"ARGS={m['args']}"] if m["args"] else [])
    try:
        result = subprocess.run(argv, cwd=ROOT, env=env, text=True, capture_output=True,
                                timeout=600)
    finally:
        subprocess.run([FANOUT, "down"], cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    if m["args"] and "--json" in m["args"]:
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        shape = dict(re.findall(r"--(accounts|services|days) (\d+)", m["args"]))
        leaves = int(shape["accounts"]) * int(shape["services"]) * int(shape["days"])
        assert summary["status"] == "succeeded"
        assert summary["stages"]["metric_day"]["succeeded"] == leaves
        assert summary["rows_written"] == leaves
    else:
        assert "succeeded" in result.stdout + result.stderr


@rule(r"\. \.venv/bin/activate")
def activate(live: LiveSystem, m: re.Match[str], cmd: Command) -> None:
    found = live.run(["bash", "-c", f"{cmd.text} && command -v fanout"])
    assert found.strip() == str(ROOT / ".venv" / "bin" / "fanout")


@rule(r"export FANOUT_REDIS_URL=redis://my-redis:6379/0")
def export_redis(live: LiveSystem, m: re.Match[str], cmd: Command) -> None:
    live.env["FANOUT_REDIS_URL"] = live.redis_url  # the README's server is this one


@rule(r"fanout vendor serve --port (?P<port>\d+)")
def vendor_serve(live: LiveSystem, m: re.Match[str], cmd: Command) -> None:
    assert cmd.background, "the README starts the vendor in the background"
    port = free_port()
    live.vendor_url = f"http://127.0.0.1:{port}"
    # Where the README's port is, in every terminal (the schedules' demo runs call it).
    live.env["FANOUT_DEMO_VENDOR_URL"] = live.base_env["FANOUT_DEMO_VENDOR_URL"] = live.vendor_url
    live.start([FANOUT, "vendor", "serve", "--port", str(port)], "vendor")

    def answers() -> bool:
        try:
            return httpx.get(f"{live.vendor_url}/accounts", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    wait_for(answers, what="the vendor")


@rule(r"fanout worker")
def worker(live: LiveSystem, m: re.Match[str], cmd: Command) -> None:
    log = live.start([FANOUT, "worker"], "worker")
    wait_for(lambda: " ready." in log.read_text(), what="the worker ready")


@rule(r"fanout flower --port (?P<port>\d+)")
def flower(live: LiveSystem, m: re.Match[str], cmd: Command) -> None:
    port = free_port()
    live.start([FANOUT, "flower", "--port", str(port)], "flower")

    def answers() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=2).text == "OK"
        except httpx.HTTPError:
            return False
    wait_for(answers, what="Flower")


@rule(r"fanout run demo --days (?P<days>\d+) --vendor-url http://127\.0\.0\.1:\d+ --wait")
def run_demo(live: LiveSystem, m: re.Match[str], cmd: Command) -> None:
    live.run([FANOUT, "run", "demo", "--days", m["days"], "--vendor-url", live.vendor_url,
              "--wait"])
    client = redis.Redis.from_url(live.redis_url, decode_responses=True)
    live.run_id = latest_run(client)
    snap = Ledger(client, 3600).view.snapshot(live.run_id)
    assert snap is not None and snap.status == "succeeded"
    # The vendor's default shape: 3 accounts x 5 services, one metric-day a day.
    assert snap.stages["metric_day"]["succeeded"] == 3 * 5 * int(m["days"])


@rule(r"fanout status")
def status(live: LiveSystem, m: re.Match[str], cmd: Command) -> None:
    assert live.run_id in live.run([FANOUT, "status"])


@rule(r"fanout failures RUN_ID")
def failures(live: LiveSystem, m: re.Match[str], cmd: Command) -> None:
    assert live.run_id, "the README lists failures before it made a run"
    live.run([FANOUT, "failures", live.run_id])


@rule(r"fanout pipelines")
def pipelines(live: LiveSystem, m: re.Match[str], cmd: Command) -> None:
    listed = json.loads(live.run([FANOUT, "pipelines", "--json"]))
    assert "demo" in json.dumps(listed)
    assert "metric_day" in live.run([FANOUT, "pipelines"])


@rule(r"fanout dead-letters")
def dead_letters(live: LiveSystem, m: re.Match[str], cmd: Command) -> None:
    live.run([FANOUT, "dead-letters"])


@rule(r"fanout beat")
def beat(live: LiveSystem, m: re.Match[str], cmd: Command) -> None:
    config = live.tmp / "fanout.toml"
    config.write_text(toml_block(README.read_text()))  # the README's own config file
    live.env["FANOUT_CONFIG"] = str(config)
    log = live.start([FANOUT, "beat"], "beat")
    wait_for(lambda: "demo_daily" in log.read_text(), what="the beat's schedules")


@rule(r"fanout schedules \[--json\]")
def schedules(live: LiveSystem, m: re.Match[str], cmd: Command) -> None:
    assert "demo_daily" in live.run([FANOUT, "schedules"])
    listed = json.loads(live.run([FANOUT, "schedules", "--json"]))
    assert [s["name"] for s in listed] == ["demo_daily"]


@rule(r"fanout schedules run (?P<name>\w+)")
def schedules_run(live: LiveSystem, m: re.Match[str], cmd: Command) -> None:
    # "Trigger one now": the run exists and runs (this terminal's Redis has no worker).
    run_id = live.run([FANOUT, "schedules", "run", m["name"]]).strip().splitlines()[-1]
    assert run_id.startswith(f"sched-{m['name']}-")
    url = live.run([FANOUT, "status", run_id, "--json"])
    assert json.loads(url.strip().splitlines()[-1])["run_id"] == run_id


@rule(r"python (?P<script>examples/\w+\.py)(?P<args>(?: \S+)*)")
def example(live: LiveSystem, m: re.Match[str], cmd: Command) -> None:
    out = live.run([sys.executable, m["script"], *shlex.split(m["args"])])
    assert cmd.comment, f"{cmd.text}: the README shows no output to compare"
    assert out.strip().splitlines()[-1] == cmd.comment


@pytest.fixture
def live(tmp_path: Path, redis_url: str) -> Iterator[LiveSystem]:
    env = dict(os.environ)
    for name in ("FANOUT_REDIS_URL", "FANOUT_CONFIG", "FANOUT_PIPELINES", "FLOWER_BASIC_AUTH"):
        env.pop(name, None)
    system = LiveSystem(tmp_path, env, redis_url)
    yield system
    system.stop_all()
    subprocess.run([FANOUT, "down"], env=env, capture_output=True, timeout=60)


def test_every_command_the_readme_shows_runs(live: LiveSystem) -> None:
    blocks = shell_blocks(README.read_text())
    assert blocks, "the README shows no commands"
    not_run = []
    for block in blocks:
        live.env = dict(live.base_env)
        for cmd in block:
            if cmd.text in NOT_RUN:
                not_run.append(cmd.text)
                continue
            matched = [(m, fn) for pattern, fn in RULES
                       if (m := re.fullmatch(pattern, cmd.text))]
            assert matched, f"the README shows a command this test does not run: {cmd.text!r}"
            match, run = matched[0]
            run(live, match, cmd)
            live.ran.append(cmd.text)
    # The worker, Flower, the beat and the vendor it started each stop warmly on SIGTERM.
    assert live.stop_all() == [0, 0, 0, 0]
    assert sorted(not_run) == sorted(NOT_RUN)
    assert len(live.ran) >= 15


def test_the_check_refuses_a_command_it_does_not_know() -> None:
    """The test above can fail: a command no rule knows is not skipped."""
    blocks = shell_blocks("```sh\nfanout frobnicate --all   # new\nmake demo &\n```\n")
    assert [(c.text, c.comment, c.background) for c in blocks[0]] == [
        ("fanout frobnicate --all", "new", False), ("make demo", "", True)]
    assert not any(re.fullmatch(p, "fanout frobnicate --all") for p, _ in RULES)
