"""Root items as data: ``fanout run PIPELINE --items FILE|-`` (JSON lines or one JSON array),
``--root-stage``, ``fanout results``, ``fanout pipelines``, and the example whose roots are data
(``examples/github_stars.py``) run from the command line on real workers and the demo vendor."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import VendorHandle, WorkerFactory

from producers.items import parse_items, read_items
from producers.trigger import (
    load_configured_pipelines,
    root_stage_of,
    stage_order,
    start_run,
)
from workers.api import Pipeline, StageContext, get_pipeline
from workers.settings import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
#: How a user reaches the example's pipeline: its folder on the import path, its module named.
STARS_ENV = {"PYTHONPATH": str(EXAMPLES), "FANOUT_PIPELINES": "github_stars"}
REPOS = ["PrefectHQ/prefect", "pydantic/pydantic", "huggingface/transformers"]
ZERO = {"enqueued": 0, "succeeded": 0, "failed": 0, "cached": 0, "retried": 0, "throttled": 0,
        "skipped": 0}


def fanout(*args: str, env: dict[str, str] | None = None, stdin: str | None = None,
           timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producers.cli", *args], input=stdin, capture_output=True,
        text=True, timeout=timeout_s, env={**os.environ, **STARS_ENV, **(env or {})},
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("fanout: error: ")
    return lines[0].removeprefix("fanout: error: ")


def last_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- reading items ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ('["a", "b"]', ["a", "b"]),
        ('[{"n": 1},\n {"n": 2}]\n', [{"n": 1}, {"n": 2}]),  # an array over several lines
        ('{"n": 1}\n\n{"n": 2}\n', [{"n": 1}, {"n": 2}]),  # JSON lines, a blank one skipped
        ('[1, 2]\n[3]\n', [[1, 2], [3]]),  # JSON lines whose items are arrays
        ('"only"', ["only"]),  # one JSON value: one item
        ("3\n4", [3, 4]),
    ],
)
def test_items_are_a_json_array_or_json_lines(text: str, items: list[Any]) -> None:
    assert parse_items(text, "--items x") == items


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "--items x: no items (give a JSON array, or one JSON value per line)"),
        ("  \n\n", "--items x: no items"),
        ("[]", "--items x: no items"),
        ('{"n": 1}\n{"n": 2\n', "--items x: line 2 is not JSON (Expecting ',' delimiter, "
                                "column 8); give a JSON array, or one JSON value per line"),
        ("PrefectHQ/prefect\n", "--items x: line 1 is not JSON (Expecting value, column 1)"),
    ],
)
def test_bad_items_are_one_line_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_items(text, "--items x")
    assert str(caught.value).startswith(message)


def test_items_from_stdin_and_unreadable_files(tmp_path: Path) -> None:
    assert read_items("-", stdin=io.StringIO('"a"\n"b"\n')) == ["a", "b"]
    with pytest.raises(ConfigError, match=r"^--items: no such file 'nope.json'$"):
        read_items("nope.json")
    with pytest.raises(ConfigError, match=r"^--items: cannot read '.*': Is a directory$"):
        read_items(str(tmp_path))
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'["caf\xe9"]')
    with pytest.raises(ConfigError, match=r"cannot read .*latin\.json.*can't decode"):
        read_items(str(latin))


# --- where the items go -----------------------------------------------------------------------


def _stage(ctx: StageContext, item: Any) -> Any:
    return item


two_heads = Pipeline("itemstest_two_heads")
two_heads.stage("left", maps_to="leaf")(_stage)
two_heads.stage("right")(_stage)
two_heads.stage("leaf")(_stage)


def test_the_root_stage_of_given_items() -> None:
    load_configured_pipelines()
    demo = get_pipeline("demo")
    assert root_stage_of(demo) == "accounts"  # the roots function's stage
    assert root_stage_of(demo, "metric_day") == "metric_day"
    assert stage_order(demo, "accounts") == ["accounts", "services", "metric_day"]
    assert stage_order(demo, "services") == ["services", "metric_day"]
    with pytest.raises(ConfigError, match=r"pipeline 'demo' has no stage 'nope' \(stages: "
                                          r"accounts, services, metric_day\)"):
        root_stage_of(demo, "nope")
    # No roots function, two stages no other maps to: nothing is guessed.
    with pytest.raises(ConfigError, match=r"several stages root items could go to "
                                          r"\(left, right\): name one \(fanout run "
                                          r"--root-stage"):
        root_stage_of(two_heads)
    assert root_stage_of(two_heads, "right") == "right"


def test_start_run_says_where_root_items_come_from(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one path the CLI, a schedule and Python share."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("FANOUT_PIPELINES", "github_stars")
    with pytest.raises(ConfigError, match=r"^pipeline 'github_stars' has no roots function: "
                                          r"give its root items as data \(fanout run --items "
                                          r"FILE, items or items_file in a schedule, "
                                          r"start_run\(roots=...\)\)$"):
        start_run("github_stars", {})
    with pytest.raises(ConfigError, match=r"^a root stage \('services'\) is for root items "
                                          r"given as data: pipeline 'demo' lists its own$"):
        start_run("demo", {}, root_stage="services")
    with pytest.raises(ConfigError, match="several stages root items could go to"):
        start_run("itemstest_two_heads", {}, roots=[1])


# --- the command line: bad input is one line and exit 2 ---------------------------------------


def test_bad_items_on_the_command_line_are_one_line_and_exit_2(tmp_path: Path) -> None:
    not_json = tmp_path / "repos.txt"
    not_json.write_text("PrefectHQ/prefect\npydantic/pydantic\n")
    empty = tmp_path / "empty.json"
    empty.write_text("\n")
    good = tmp_path / "repos.json"
    good.write_text(json.dumps(REPOS))
    cases = {
        ("--items", str(tmp_path / "gone.json")): f"--items: no such file "
                                                  f"'{tmp_path / 'gone.json'}'",
        ("--items", str(not_json)): f"--items {not_json}: line 1 is not JSON (Expecting value, "
                                    "column 1); give a JSON array, or one JSON value per line",
        ("--items", str(empty)): f"--items {empty}: no items (give a JSON array, or one JSON "
                                 "value per line)",
        ("--items", str(good), "--root-stage", "nope"):
            "pipeline 'github_stars' has no stage 'nope' (stages: fetch_stats)",
        (): "pipeline 'github_stars' has no roots function: give its root items with --items "
            "FILE (JSON lines or a JSON array; - reads stdin)",
    }
    for args, message in cases.items():
        assert one_line_error(fanout("run", "github_stars", *args)) == message, args
    assert one_line_error(fanout("run", "demo", "--root-stage", "services")) == \
        "--root-stage needs --items (it names the stage they go to)"
    assert one_line_error(fanout("run", "github_stars", "--items", "-", stdin="")) == \
        "--items stdin: no items (give a JSON array, or one JSON value per line)"
    unknown = one_line_error(fanout("run", "gihtub_stars", "--items", str(good)))
    assert unknown == "unknown pipeline 'gihtub_stars' (known: demo, demo_report, github_stars)"


# --- fanout pipelines -------------------------------------------------------------------------


def test_pipelines_lists_every_importable_pipeline_with_its_stages() -> None:
    listed = fanout("pipelines", "--json")
    assert listed.returncode == 0, listed.stderr
    pipelines = {p["name"]: p for p in json.loads(listed.stdout)}
    assert list(pipelines) == ["demo", "demo_report", "github_stars"]
    stars = pipelines["github_stars"]
    assert {k: stars[k] for k in ("module", "roots_function", "root_stage", "items_stage")} == {
        "module": "github_stars", "roots_function": False, "root_stage": None,
        "items_stage": "fetch_stats"}
    [fetch] = stars["stages"]
    assert fetch == {
        "name": "fetch_stats", "task": "github_stars.fetch_stats", "maps_to": None,
        "claim_batch": 1, "max_iterations": 1000, "cache": "inputs", "cache_key": None,
        "cache_ttl_s": 86400, "limits": [], "retries": 3, "retry_delay_s": 1.0,
        "retry_jitter": 0.0, "retry_on": "Exception", "retry_if": None, "hooks": [],
    }
    demo = pipelines["demo"]
    assert (demo["roots_function"], demo["root_stage"], demo["items_stage"]) == \
        (True, "accounts", "accounts")
    assert [(s["name"], s["maps_to"], s["claim_batch"], s["retries"]) for s in demo["stages"]] \
        == [("accounts", "services", 1, 0), ("services", "metric_day", 16, 0),
            ("metric_day", None, 64, 3)]
    assert demo["stages"][2]["retry_delay_s"] == "exponential(0.5, 2, 30)"

    table = fanout("pipelines")
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if "fetch_stats" in line]
    assert len(rows) == 1
    assert "github_stars" in rows[0] and "--items" in rows[0] and "inputs, ttl 86400s" in rows[0]


# --- real runs --------------------------------------------------------------------------------


def test_github_stars_from_the_command_line_has_the_examples_rows(
    tmp_path: Path, redis_url: str, vendor: VendorHandle, start_worker: WorkerFactory
) -> None:
    # The example as its docstring runs it (its own vendor and workers, which stop with it).
    example = subprocess.run([sys.executable, str(EXAMPLES / "github_stars.py")],
                             capture_output=True, text=True, timeout=180,
                             env={**os.environ, "FANOUT_REDIS_URL": redis_url})
    assert example.returncode == 0, example.stderr
    lines = example.stdout.strip().splitlines()
    assert lines[0] == "fetch_stats: 3 fetched, 0 cached, 0 retried"
    stars = {repo: int(count.removesuffix(" stars"))
             for repo, count in (line.split(": ") for line in lines[1:])}
    assert list(stars) == REPOS
    # Its results are cached for a day: forget them, so the command line fetches again.
    cleared = fanout("cache", "clear", "github_stars")
    assert (cleared.returncode, cleared.stdout) == (0, "cleared 3 cached results of "
                                                       "github_stars\n")

    start_worker(STARS_ENV)
    repos = tmp_path / "repos.json"
    repos.write_text(json.dumps(REPOS))
    ran = fanout("run", "github_stars", "--items", str(repos), "--vendor-url", vendor.url,
                 "--wait", "--json")
    assert ran.returncode == 0, ran.stderr
    summary = last_json(ran)
    assert summary["status"] == "succeeded"
    assert summary["stages"] == {"fetch_stats": {**ZERO, "enqueued": 3, "succeeded": 3}}
    assert summary["rows_written"] == 0  # its stage returns JSON values, not sink records
    assert vendor.stats()["by_endpoint"]["repos"] == 3

    results = fanout("results", summary["run_id"], "--json")
    assert results.returncode == 0, results.stderr
    assert json.loads(results.stdout) == [
        {"full_name": repo, "stargazers_count": stars[repo]} for repo in REPOS]
    lines_out = fanout("results", summary["run_id"])
    assert [json.loads(line)["full_name"] for line in lines_out.stdout.splitlines()] == REPOS


def test_items_from_stdin_as_json_lines_in_batches_with_a_kill_switch(
    vendor: VendorHandle, start_worker: WorkerFactory
) -> None:
    """JSON lines on stdin, run as a batch map of 2: the first repo answers 404 (a vendor 4xx
    fails at once, no retries), so the switch kills the run after batch 1 of 3."""
    repos = ["acme/gone", *REPOS, "acme/late"]
    vendor.configure(not_found_paths=["/repos/acme/gone"])
    start_worker(STARS_ENV)
    lines = "\n".join(json.dumps(repo) for repo in repos) + "\n\n"
    ran = fanout("run", "github_stars", "--items", "-", "-p", f"base_url={vendor.url}",
                 "--batch-size", "2", "--kill-switch", "any_failed", "--wait", "--json",
                 stdin=lines)
    assert ran.returncode == 1, ran.stderr
    summary = last_json(ran)
    assert summary["status"] == "killed"
    assert summary["stages"] == {"fetch_stats": {**ZERO, "enqueued": 5, "succeeded": 1,
                                                 "failed": 1, "skipped": 3}}
    reason = ("AnyFailed: 1 failed: fetch_stats batch map stopped after 2 of 5 items "
              "(1 succeeded, 1 failed)")
    assert summary["stop_reason"] == reason
    assert vendor.stats()["by_path"] == {"/repos/acme/gone": 1, "/repos/PrefectHQ/prefect": 1}
    results = json.loads(fanout("results", summary["run_id"], "--json").stdout)
    assert [r and r["full_name"] for r in results] == [None, "PrefectHQ/prefect", None, None,
                                                       None]

    # `fanout status RUN` shows why the run stopped, as the JSON does.
    status = fanout("status", summary["run_id"])
    assert status.returncode == 1
    assert f"killed: {reason}" in status.stdout
    failures = fanout("failures", summary["run_id"])
    [failure, raised, count] = failures.stdout.strip().splitlines()
    assert failure.startswith("fetch_stats fetch_stats:")
    assert f"VendorHTTPError: HTTP 404 from {vendor.url}/repos/acme/gone" in failure
    assert failure.endswith(' (attempts 1) "acme/gone"')  # one HTTP call: no HTTP retries
    assert raised.startswith("  raised at ")
    assert count == f"1 failed items in run {summary['run_id']}"
