"""The docs site builds strictly and says what the code does: every command and option of
``fanout``, every setting, the latest benchmark figures, the API objects; the deployment guide's
worked example runs; the README's pipeline snippet is the example file's code."""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import VendorHandle, WorkerFactory, require_service, sink_rows
from test_readme_settings import read_by_the_code

from demo_vendor import data
from demo_vendor.__main__ import build_parser as vendor_parser
from demo_vendor.config import VendorConfig
from producers.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_EXAMPLE = ROOT / "docs" / "examples" / "deploy"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built as CI builds it: strict, from another directory."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(out)],
        capture_output=True, text=True, timeout=300, cwd=out,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "WARNING" not in log, log
    return out


def article(site: Path, page: str) -> str:
    """The page's content (its <article>), HTML."""
    text = (site / page).read_text()
    return text[text.index("<article"):text.index("</article>")]


def plain(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


# -- the command line -------------------------------------------------------------------


def commands(parser: argparse.ArgumentParser, path: str = "fanout",
             ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command and the parser of its options. ``fanout vendor serve`` hands its options
    to the demo vendor's parser untouched: those are the options it takes."""
    if path == "fanout vendor serve":
        parser = next(sub for action in vendor_parser()._actions
                      if isinstance(action, argparse._SubParsersAction)
                      for name, sub in action.choices.items() if name == "serve")
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, f"{path} {name}")


def anchor_of(path: str) -> str:
    return path.replace(" ", "-")


def missing_from(cli_page: str, parser: argparse.ArgumentParser) -> list[str]:
    """What the CLI page does not say of ``parser``: commands, arguments, help texts,
    defaults."""
    parts = re.split(r'<h\d id="(fanout-[a-z-]+)"', cli_page)
    texts = {"fanout": plain(parts[0])}
    texts.update((anchor, plain(body)) for anchor, body in zip(parts[1::2], parts[2::2],
                                                                strict=True))
    missing = []
    for path, command in commands(parser):
        anchor = "fanout" if path == "fanout" else anchor_of(path)
        if anchor not in texts:
            missing.append(f"{path}: no section")
            continue
        text = texts[anchor]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            # A positional shows as its metavar, its name or, with choices, its choices.
            names = action.option_strings or (
                [str(c) for c in action.choices] if action.choices and not action.metavar
                else [action.metavar or action.dest])
            missing += [f"{path}: {name}" for name in names if str(name) not in text]
            # A help text with %(default)s and the like is shown expanded: its default is
            # checked below.
            help_text = "" if "%" in (action.help or "") else (action.help or "")
            if help_text and help_text.replace("`", "") not in text:
                missing.append(f"{path}: help of {names[0]}")
            default = action.default
            if default not in (None, False, [], argparse.SUPPRESS) and str(default) not in text:
                missing.append(f"{path}: default of {names[0]}")
    return missing


def test_the_cli_page_has_every_command_option_help_text_and_default(site: Path) -> None:
    page = article(site, "reference/cli.html")
    parser = build_parser()
    assert missing_from(page, parser) == []
    # Sections of commands that do not exist would be stale too.
    ids = set(re.findall(r'<h\d id="(fanout-[a-z-]+)"', page))
    expected = {anchor_of(path) for path, _ in commands(parser) if path != "fanout"}
    assert ids == expected
    assert {"fanout-run", "fanout-cache-clear", "fanout-limits-set", "fanout-vendor-serve"} <= ids


def test_the_check_finds_a_command_or_option_the_page_lacks(site: Path) -> None:
    page = article(site, "reference/cli.html")
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    # A default no help text of `fanout run` holds (a "7" is in 127.0.0.1).
    sub.choices["run"].add_argument("--shiny", default="sparkly", help="a new option")
    sub.add_parser("teleport").add_argument("--where")
    assert missing_from(page, parser) == [
        "fanout run: --shiny", "fanout run: help of --shiny", "fanout run: default of --shiny",
        "fanout teleport: no section",
    ]


# -- settings, benchmarks, the API ------------------------------------------------------


def test_the_settings_page_lists_every_variable_the_code_reads(site: Path) -> None:
    text = plain(article(site, "reference/settings.html"))
    variables = read_by_the_code()
    assert {"FANOUT_REDIS_URL", "FANOUT_PIPELINES", "FANOUT_SCHEDULE_LEASE_S"} <= variables
    assert sorted(v for v in variables if v not in text) == []


def test_the_benchmarks_page_shows_each_suites_latest_figures(site: Path) -> None:
    text = plain(article(site, "reference/benchmarks.html"))
    runs = [(path, json.loads(path.read_text())["suites"])
            for path in sorted((ROOT / "benchmarks" / "results").glob("*.json"))]
    harvest_file, harvest = next((path, suites["harvest"]) for path, suites in reversed(runs)
                                 if suites.get("harvest", {}).get("status") == "ok")
    section = text.split("harvest¶", 1)[1].split("pools¶", 1)[0]
    assert f"From benchmarks/results/{harvest_file.name};" in section
    figures = harvest["figures"]
    for rate in (figures["metric_days_per_s"]["fanout"], figures["metric_days_per_s"]["celery"]):
        assert f"{rate:,.1f}" in section
    assert f"{figures['ratios']['fanout/dramatiq']:.2f}x" in section
    latest_suites = {name for name, suite in runs[-1][1].items() if suite["status"] == "ok"}
    assert text.count(f"From benchmarks/results/{runs[-1][0].name};") == len(latest_suites)


@pytest.mark.parametrize(("page", "objects"), [
    ("api/authoring.html", ["workers.api.Pipeline", "workers.api.Pipeline.stage",
                            "workers.api.StageContext.map", "workers.api.Loop",
                            "workers.api.Record"]),
    ("api/hooks.html", ["workers.hooks.Hook", "workers.hooks.Skip", "workers.hooks.Retry"]),
    ("api/kill-switches.html", ["workers.policy.kill_switch.AnyFailed",
                                "workers.policy.kill_switch.FailureRate",
                                "workers.policy.kill_switch.parse"]),
    ("api/http.html", ["workers.http.request_json"]),
    ("api/start-run.html", ["producers.trigger.start_run"]),
    ("api/ledger.html", ["workers.ledger.view.RunView.snapshot",
                         "workers.ledger.records.RunSnapshot"]),
    ("api/sinks.html", ["workers.sinks.base.Sink.write"]),
])
def test_the_api_reference_documents(site: Path, page: str, objects: list[str]) -> None:
    content = article(site, page)
    assert [o for o in objects if f'id="{o}"' not in content] == []


# -- the deployment guide's worked example ----------------------------------------------


def _fanout(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed ``fanout`` script, as a user runs it (its directory on the import path,
    not the working directory)."""
    script = Path(sys.executable).parent / "fanout"
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=180,
                          env=env, cwd=cwd)


def test_the_deploying_guide_example_runs_with_the_module_on_every_side(
    vendor: VendorHandle, start_worker: WorkerFactory, sink_path: Path, tmp_path: Path
) -> None:
    deploy = {"FANOUT_PIPELINES": "acme_pipelines.stars", "PYTHONPATH": str(DEPLOY_EXAMPLE)}
    start_worker(deploy)
    repos = ["celery/kombu", "celery/celery", "redis/redis-py"]
    env = {**os.environ, **deploy}
    result = _fanout("run", "acme_stars", "-p", f"repos={json.dumps(repos)}", "-p",
                     "day=2026-01-31", "--vendor-url", vendor.url, "--wait", "--json",
                     env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded"
    assert summary["stages"]["repo"]["succeeded"] == 3
    assert summary["rows_written"] == 3
    seed = VendorConfig().seed
    assert [row[:6] for row in sink_rows(sink_path)] == sorted(
        ("acme", owner, name, "stars", "2026-01-31", float(data.stars(seed, owner, name)))
        for owner, name in (r.split("/") for r in repos)
    )
    assert vendor.stats()["by_endpoint"]["repos"] == 3


def test_the_deploying_guide_says_what_a_missing_path_or_name_does(tmp_path: Path) -> None:
    without_path = {**os.environ, "FANOUT_PIPELINES": "acme_pipelines.stars"}
    without_path.pop("PYTHONPATH", None)
    result = _fanout("run", "acme_stars", env=without_path, cwd=DEPLOY_EXAMPLE)
    assert result.returncode == 2
    assert result.stderr.strip() == ("fanout: error: cannot import pipeline module "
                                     "'acme_pipelines.stars': No module named 'acme_pipelines'")
    guide = (ROOT / "docs" / "guide" / "deploying.md").read_text()
    assert result.stderr.strip() in guide

    without_name = {**os.environ, "PYTHONPATH": str(DEPLOY_EXAMPLE)}
    without_name.pop("FANOUT_PIPELINES", None)
    result = _fanout("run", "acme_stars", env=without_name, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("fanout: error: unknown pipeline 'acme_stars' "
                                     "(known: demo, demo_report)")
    assert "`unknown pipeline 'acme_stars' (known: demo, demo_report)`" in guide


def test_the_compose_override_gives_every_fanout_service_the_module() -> None:
    if shutil.which("docker-compose") is None:
        require_service("docker-compose (Debian's package) is not installed")
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "-f",
         str(DEPLOY_EXAMPLE / "compose.override.yaml"), "config"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "FLOWER_BASIC_AUTH": "ops:a-password-of-ours"},
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    mount = f"{DEPLOY_EXAMPLE / 'acme_pipelines'}:/opt/acme/acme_pipelines:ro"
    for name in ("worker", "beat", "flower", "producer"):
        service = services[name]
        assert service["environment"]["FANOUT_PIPELINES"] == "acme_pipelines.stars", name
        assert service["environment"]["PYTHONPATH"] == "/opt/acme", name
        assert mount in service["volumes"], name
    assert services["producer"]["command"][:3] == ["fanout", "run", "acme_stars"]


# -- the README -------------------------------------------------------------------------


def test_the_readme_pipeline_snippet_is_the_example_files_code() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Writing a pipeline", 1)[1].split("\n## ", 1)[0]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    example = (ROOT / "examples" / "fibonacci.py").read_text()
    lines = [line for line in snippet.splitlines() if line.strip()]
    assert len(lines) >= 10
    assert [line for line in lines if line not in example.splitlines()] == []
