"""Stage settings and run defaults in the config file: ``[stages."PIPELINE.STAGE"]`` over what
Python declares, checked by the same option owners as ``Pipeline.stage`` (in this process), then
on real workers (retries, claim_batch and a limit that change what they do, counted exactly);
``[pipelines.NAME]`` batch map defaults for ``fanout run``; and a bad file, one line and exit 2,
from ``fanout run`` and from a plain ``celery -A workers worker``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import config_pipelines
import httpx
import pytest
import redis
from config_pipelines import cfgtest
from conftest import VendorHandle, WorkerFactory

from producers.config_file import RunDefaults, parse_limits, parse_run_defaults
from producers.trigger import load_configured_pipelines, start_run
from workers.api import find_stage, get_pipeline
from workers.config_file import read_config
from workers.engine.services import services
from workers.limits import Limits
from workers.policy.kill_switch import AnyFailed, FailureCount, FailureRate
from workers.policy.retry import OPTIONS as RETRY_OPTIONS
from workers.policy.retry import RetryPolicy, exponential
from workers.settings import ConfigError
from workers.stage_config import apply_config_file, apply_stage_settings

TESTS = Path(__file__).resolve().parent
WORKER_ENV = {"PYTHONPATH": str(TESTS), "FANOUT_PIPELINES": "config_pipelines"}
ZERO = {"enqueued": 0, "succeeded": 0, "failed": 0, "cached": 0, "retried": 0,
        "throttled": 0, "skipped": 0}
KNOWN = ("cache, cache_key, cache_ttl_s, claim_batch, limits, max_iterations, retries, "
         "retry_delay_s, retry_if, retry_jitter, retry_on")


@pytest.fixture(autouse=True)
def _declared_stages() -> Iterator[None]:
    """Each test's stage settings go with it: every stage as Python declared it again."""
    yield
    apply_stage_settings({})


def apply(tables: dict[str, Any]) -> list[str]:
    return apply_stage_settings({"stages": tables}, "fanout.toml")


# --- [stages] in this process -----------------------------------------------------------------


def test_the_config_overrides_what_python_declared_and_keeps_the_rest() -> None:
    declared = cfgtest.stages["flaky"]
    assert (declared.options["retries"], declared.claim_batch) == (0, 1)

    assert apply({"cfgtest.flaky": {"retries": 3, "retry_delay_s": [0, 0.5],
                                    "claim_batch": 4, "max_iterations": 7}}) == ["cfgtest.flaky"]
    stage = cfgtest.stages["flaky"]
    assert (stage.options["retries"], stage.options["retry_delay_s"]) == (3, [0, 0.5])
    assert stage.options["retry_on"] is ValueError  # declared in Python, not in the file
    assert (stage.claim_batch, stage.max_iterations) == (4, 7)
    assert (stage.fn, stage.maps_to) == (declared.fn, declared.maps_to)
    assert find_stage("cfgtest.flaky") is stage  # what the engine looks up
    assert cfgtest.stages["leaf"].claim_batch == 1  # a stage the file does not name

    # Applied again, from what Python declared (not over the last settings).
    apply({"cfgtest.flaky": {"claim_batch": 2}})
    assert (cfgtest.stages["flaky"].options["retries"], cfgtest.stages["flaky"].claim_batch) \
        == (0, 2)
    assert apply({}) == []
    assert cfgtest.stages["flaky"] is declared


def test_a_stage_may_be_a_quoted_key_or_a_table_per_pipeline() -> None:
    assert apply({"cfgtest": {"leaf": {"claim_batch": 8}, "flaky": {"retries": 2}}}) == [
        "cfgtest.flaky", "cfgtest.leaf"]
    assert cfgtest.stages["leaf"].claim_batch == 8
    assert cfgtest.stages["flaky"].options["retries"] == 2


def test_what_toml_cannot_hold_is_written_in_a_form_its_owner_converts() -> None:
    apply({
        "cfgtest.flaky": {"retries": 2, "retry_delay_s": {"base_s": 0.5, "factor": 3, "max_s": 9},
                          "retry_on": ["KeyError", "httpx:TransportError"],
                          "retry_if": "config_pipelines:never_retry", "retry_jitter": 0.25},
        "cfgtest.leaf": {"cache": "inputs", "cache_key": "config_pipelines:key_of",
                         "cache_ttl_s": 60, "limits": ["vendor-a", "vendor-b"]},
    })
    flaky, leaf = cfgtest.stages["flaky"].options, cfgtest.stages["leaf"].options
    assert flaky["retry_delay_s"] == exponential(0.5, 3, 9)
    assert flaky["retry_on"] == (KeyError, httpx.TransportError)
    assert flaky["retry_if"] is config_pipelines.never_retry
    assert (leaf["cache"], leaf["cache_key"], leaf["cache_ttl_s"]) == (
        "inputs", config_pipelines.key_of, 60)
    assert leaf["limits"] == ["vendor-a", "vendor-b"]
    # The retry hook builds its policy from them as from a Python declaration.
    policy = RetryPolicy.from_options(**RETRY_OPTIONS.of(flaky))
    assert [policy.delay_for(n, rand=lambda: 0.5) for n in (1, 2, 3, 4)] == [0.5, 1.5, 4.5, 9.0]
    assert policy.should_retry(httpx.ConnectError("down"), 1) is False  # retry_if said no


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ({"cfgtest.flaky": {"retires": 3}},
         f"stage cfgtest.flaky: unknown option 'retires', did you mean 'retries'? "
         f"(known: {KNOWN})"),
        ({"cfgtest.flaky": {"colour": "red"}},
         f"stage cfgtest.flaky: unknown option 'colour' (known: {KNOWN})"),
        ({"cfgtest.flaky": {"retries": -1}},
         "stage cfgtest.flaky: retries must be a whole number >= 0, got -1"),
        ({"cfgtest.flaky": {"claim_batch": 0}},
         "stage cfgtest.flaky: claim_batch must be a whole number >= 1, got 0"),
        ({"cfgtest.flaky": {"max_iterations": "5"}},
         "stage cfgtest.flaky: max_iterations must be a whole number >= 1, got '5'"),
        ({"cfgtest.flaky": {"maps_to": "leaf"}},
         "stage cfgtest.flaky: maps_to is set in Python only (@pipeline.stage), not in the "
         "config file"),
        ({"cfgtest.flaky": {"retry_on": "NoSuchError"}},
         "stage cfgtest.flaky: retry_on 'NoSuchError' cannot be imported: module 'builtins' "
         "has no attribute 'NoSuchError'"),
        ({"cfgtest.flaky": {"retry_delay_s": {"base": 1}}},
         "stage cfgtest.flaky: retry_delay_s: unknown key 'base' of an exponential delay "
         "(known: base_s, factor, max_s)"),
        ({"cfgtest.flaky": {"retry_delay_s": {"base_s": 1, "factor": 0.5}}},
         "stage cfgtest.flaky: exponential factor must be a number >= 1, got 0.5"),
        ({"cfgtest.flaky": {"retry_if": "never_retry"}},
         "stage cfgtest.flaky: retry_if must be an import path package.module:name, got "
         "'never_retry'"),
        ({"cfgtest.leaf": {"limits": "vendor-a"}},
         "stage cfgtest.leaf: limits must be a list of limit names, got 'vendor-a'"),
        ({"cfgtest.leaf": {"cache": "outputs"}},
         "stage cfgtest.leaf: cache must be 'inputs', got 'outputs'"),
        ({"cfgtest.leaf": 3},
         'stage cfgtest.leaf: must be a table of settings, got 3 (a stage is '
         '[stages."PIPELINE.STAGE"])'),
        ({"cfgtest": {"retries": 3}},
         'stage cfgtest.retries: must be a table of settings, got 3 (a stage is '
         '[stages."PIPELINE.STAGE"])'),
        ({"cfgtest.leaf": {}, "cfgtest": {"leaf": {}}}, "stage cfgtest.leaf: given twice"),
        ({"cfgtest.flakey": {}},
         "stage cfgtest.flakey: pipeline 'cfgtest' has no stage 'flakey', did you mean "
         "'flaky'? (stages: flaky, leaf, fetch)"),
    ],
)
def test_a_bad_stage_setting_names_the_file_the_stage_and_the_option(
    tables: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        apply({"cfgtest.fetch": {"claim_batch": 8}, **tables})
    assert str(refused.value) == f"fanout.toml: {message}"
    assert cfgtest.stages["fetch"].claim_batch == 1  # all checked before any is applied


def test_an_unknown_pipeline_or_section_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        apply({"cfgtset.flaky": {}})
    assert re.fullmatch(r"fanout\.toml: stage cfgtset\.flaky: unknown pipeline 'cfgtset', did "
                        r"you mean 'cfgtest'\? \(known: .*cfgtest.*\)", str(refused.value))
    config = tmp_path / "fanout.toml"
    config.write_text('[stage."cfgtest.leaf"]\nclaim_batch = 8\n')
    with pytest.raises(ConfigError) as refused:
        apply_config_file(config)
    assert str(refused.value) == (f"{config}: unknown key 'stage', did you mean 'stages'? "
                                  "(known: schedules, limits, stages, pipelines)")


def test_the_readme_example_is_what_it_says(tmp_path: Path) -> None:
    readme = (TESTS.parent / "README.md").read_text()
    section = readme.split("\n## Config file\n", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```toml\n(.*?)```", section, re.DOTALL)
    config = tmp_path / "fanout.toml"
    config.write_text(block)
    load_configured_pipelines()
    data, source = read_config(config)
    assert apply_stage_settings(data, source) == ["demo.metric_day"]
    stage = get_pipeline("demo").stages["metric_day"]
    assert (stage.options["retries"], stage.options["retry_delay_s"], stage.options["limits"],
            stage.claim_batch) == (5, exponential(0.5, 2, 30), ["demo-vendor"], 64)
    assert stage.options["retry_on"] == (httpx.HTTPError, ValueError)
    assert parse_run_defaults(data, source) == {"demo": RunDefaults(100, "failure_rate:20:0.5")}
    assert [(c.name, str(c.rate), c.concurrency) for c in parse_limits(data, source)] == [
        ("demo-vendor", "50/s", 8)]


# --- [pipelines] run defaults -----------------------------------------------------------------


def test_run_defaults_fill_what_a_run_does_not_say_each_on_its_own() -> None:
    found = parse_run_defaults({"pipelines": {"demo": {
        "batch_size": 100, "kill_switch": "failure_rate:20:0.5"}}}, "fanout.toml")
    assert found == {"demo": RunDefaults(100, "failure_rate:20:0.5")}
    demo = found["demo"]
    assert demo.fill() == {"batch_size": 100, "kill_switch": FailureRate(20, 0.5)}
    assert demo.fill(batch_size=5) == {"batch_size": 5, "kill_switch": FailureRate(20, 0.5)}
    assert demo.fill(kill_switch=AnyFailed(), per_item=True) == {
        "batch_size": 100, "kill_switch": AnyFailed(), "per_item": True}
    assert RunDefaults().fill() == {}  # no batch map
    assert RunDefaults().fill(batch_size=3) == {"batch_size": 3, "kill_switch": None}
    # A switch without a size waits for a run that is a batch map.
    switch_only = RunDefaults(kill_switch="failure_count:2", per_item=True)
    assert switch_only.fill() == {}
    assert switch_only.fill(batch_size=4) == {"batch_size": 4, "kill_switch": FailureCount(2),
                                              "per_item": True}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"batchsize": 2}, "pipeline 'demo': unknown key 'batchsize' (known: batch_size, "
                           "kill_switch, per_item)"),
        ({"batch_size": 0}, "pipeline 'demo': batch_size must be a whole number >= 1, got 0"),
        ({"batch_size": 2, "kill_switch": "often"},
         "pipeline 'demo': kill switch 'often': expected one of any_failed"),
        ({"batch_size": 2, "per_item": "yes"},
         "pipeline 'demo': per_item must be true or false, got 'yes'"),
        ({"batch_size": 2, "per_item": True}, "pipeline 'demo': per_item needs a kill_switch"),
        (5, "pipeline 'demo': must be a table, got 5"),
    ],
)
def test_a_bad_run_default_names_the_pipeline_and_the_value(table: Any, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_run_defaults({"pipelines": {"demo": table}}, "fanout.toml")
    assert str(refused.value).startswith(f"fanout.toml: {message}")
    with pytest.raises(ConfigError, match=r"^fanout\.toml: unknown pipeline 'nosuch'"):
        parse_run_defaults({"pipelines": {"nosuch": {"batch_size": 2}}}, "fanout.toml")


# --- the command line and a plain celery worker -----------------------------------------------


def fanout(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "producers.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


def celery_worker(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "celery", "-A", "workers", "worker",
                           "--pool", "threads", "-c", "1"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[stages."demo.metric_day"]\nretires = 5\n',
         "stage demo.metric_day: unknown option 'retires', did you mean 'retries'?"),
        ("[stages.demo.metric_dya]\nretries = 5\n",
         "stage demo.metric_dya: pipeline 'demo' has no stage 'metric_dya', did you mean "
         "'metric_day'? (stages: accounts, services, metric_day)"),
        ('[stages."demo.metric_day"]\nlimits = "demo-vendor"\n',
         "stage demo.metric_day: limits must be a list of limit names, got 'demo-vendor'"),
        ('[stagse."demo.metric_day"]\nretries = 5\n',
         "unknown key 'stagse', did you mean 'stages'?"),
    ],
)
def test_a_bad_config_is_one_line_and_exit_2_for_fanout_run_and_a_plain_celery_worker(
    tmp_path: Path, toml: str, message: str
) -> None:
    config = tmp_path / "fanout.toml"
    config.write_text(toml)
    env = {"FANOUT_CONFIG": str(config)}
    for result in (fanout("run", "demo", "--days", "1", env=env), celery_worker(env)):
        assert result.returncode == 2, result
        [line] = result.stderr.splitlines()
        assert line.startswith(f"fanout: error: {config}: {message}"), line


def test_a_bad_run_default_is_one_line_and_exit_2_for_fanout_run(tmp_path: Path) -> None:
    config = tmp_path / "fanout.toml"
    config.write_text("[pipelines.demo]\nbatch_size = 0\n")
    result = fanout("run", "demo", env={"FANOUT_CONFIG": str(config)})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"fanout: error: {config}: pipeline 'demo': batch_size must be a whole number >= 1, "
        "got 0"]


# --- on real workers --------------------------------------------------------------------------


def wait_summary(run_id: str, stages: list[str]) -> dict[str, Any]:
    ledger = services().ledger
    assert ledger.view.wait(run_id, 90) is not None, f"run {run_id} did not finish"
    snap = ledger.view.snapshot(run_id, stages)
    assert snap is not None
    return snap.summary()


def test_retries_and_claim_batch_from_the_config_file_change_what_workers_do(
    tmp_path: Path, start_worker: WorkerFactory
) -> None:
    config = tmp_path / "fanout.toml"
    config.write_text('[stages."cfgtest.flaky"]\nretries = 3\nretry_delay_s = 0\n\n'
                      "[stages.cfgtest.leaf]\nclaim_batch = 8\n")
    # Both runs wait on their queues before the one worker thread starts, taking one message
    # at a time (prefetch 1): a leaf task then claims 7 more of the 15 waiting, then of the 7.
    flaky_run = start_run("cfgtest", {}, roots=[0, 1, 2, 3, 4], root_stage="flaky")
    leaf_run = start_run("cfgtest", {}, roots=list(range(16)), root_stage="leaf")
    start_worker({**WORKER_ENV, "FANOUT_CONFIG": str(config),
                  "FANOUT_PREFETCH_MULTIPLIER": "1"}, concurrency=1)

    flaky = wait_summary(flaky_run, ["flaky"])
    # Declared with no retries, items 1-4 would fail at once. With 3 from the file, item n
    # succeeds on try n + 1 (n retries) up to 3; item 4 fails after 4 tries.
    assert flaky["status"] == "partial"
    assert flaky["stages"]["flaky"] == {**ZERO, "enqueued": 5, "succeeded": 4, "failed": 1,
                                        "retried": 0 + 1 + 2 + 3 + 3}
    ledger = services().ledger
    assert ledger.view.results(flaky_run) == [0, 1, 2, 3, None]
    [failure] = ledger.view.failures(flaky_run).values()
    assert (failure["item"], failure["error_type"], failure["attempts"]) == (4, "ValueError", 4)

    leaf = wait_summary(leaf_run, ["leaf"])
    assert leaf["stages"]["leaf"] == {**ZERO, "enqueued": 16, "succeeded": 16}
    assert ledger.view.results(leaf_run) == list(range(16))
    # Declared with claim_batch 1, each of the 16 would be a task of its own.
    log = (tmp_path / "worker0.log").read_text()
    leaf_tasks = re.findall(r"Task cfgtest\.leaf\[[^\]]+\] succeeded in [^:]+: (.*)", log)
    assert leaf_tasks == ["'succeeded; batch of 7 more: 7 succeeded'"] * 2, log[-3000:]


def test_a_concurrency_limit_from_the_config_file_holds_as_the_vendor_sees_it(
    tmp_path: Path, vendor: VendorHandle, start_worker: WorkerFactory,
    redis_client: redis.Redis,
) -> None:
    config = tmp_path / "fanout.toml"
    config.write_text("[limits.cfg-vendor]\nconcurrency = 2\n\n"
                      '[stages."cfgtest.fetch"]\nlimits = ["cfg-vendor"]\n')
    applied = fanout("limits", "apply", env={**WORKER_ENV, "FANOUT_CONFIG": str(config)})
    assert applied.stdout.splitlines() == ["limit cfg-vendor: concurrency 2"], applied.stderr
    vendor.configure(latency_ms=200)
    # Six threads, twelve calls of 200 ms, and no limit in the Python declaration: only the
    # file's holds them to two in flight.
    start_worker({**WORKER_ENV, "FANOUT_CONFIG": str(config)}, concurrency=6)
    run_id = start_run("cfgtest", {"vendor_url": vendor.url}, roots=list(range(1, 13)),
                       root_stage="fetch")

    summary = wait_summary(run_id, ["fetch"])
    assert summary["status"] == "succeeded"
    stages = summary["stages"]["fetch"]
    assert (stages["enqueued"], stages["succeeded"], stages["failed"]) == (12, 12, 0)
    stats = vendor.stats()
    assert stats["max_in_flight"] == 2
    assert {p: n for p, n in stats["by_path"].items() if p.startswith("/fib/")} == {
        f"/fib/{n}": 1 for n in range(1, 13)}
    assert Limits(redis_client).status("cfg-vendor")["in_use"] == 0


def test_fanout_run_starts_a_batch_map_from_the_pipelines_defaults(
    tmp_path: Path, vendor: VendorHandle, start_worker: WorkerFactory
) -> None:
    config = tmp_path / "fanout.toml"
    config.write_text('[pipelines.demo]\nbatch_size = 2\nkill_switch = "failure_count:2"\n')
    vendor.configure(accounts=5, services=2,
                     not_found_paths=["/accounts/acct-001/services",
                                      "/accounts/acct-002/services"])
    start_worker(concurrency=4)
    result = fanout("run", "demo", "--days", "1", "--vendor-url", vendor.url, "--wait",
                    "--json", env={"FANOUT_CONFIG": str(config)})
    # As `--batch-size 2 --kill-switch failure_count:2` would: the first batch's two accounts
    # fail, the switch trips, the other three are never listed.
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "killed"
    assert "FailureCount: 2 failed" in summary["stop_reason"]
    assert summary["stages"]["accounts"] == {**ZERO, "enqueued": 5, "failed": 2, "skipped": 3}
    assert summary["stages"]["services"] == ZERO
    assert sorted(p for p in vendor.stats()["by_path"] if p.endswith("/services")) == [
        "/accounts/acct-001/services", "/accounts/acct-002/services"]
