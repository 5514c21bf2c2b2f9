"""Schedules whose root items are data: ``items = [...]`` or ``items_file`` (relative to the
config file) and ``root_stage``, checked when the config loads, and a real ``fanout beat`` that
fires such schedules into runs ending with the exact rows and results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import VendorHandle, WorkerFactory, sink_rows, wait_for

from producers.scheduling import Schedule, load_schedules, parse_config
from workers import keys
from workers.ledger import Ledger
from workers.policy.kill_switch import AnyFailed
from workers.settings import ConfigError

ROOT = Path(__file__).resolve().parents[1]
STARS_ENV = {"PYTHONPATH": str(ROOT / "examples"), "FANOUT_PIPELINES": "github_stars"}
REPOS = ["PrefectHQ/prefect", "pydantic/pydantic", "huggingface/transformers"]
DAYS = [{"account": "acct-001", "service": "svc-002", "day": "2026-01-30"},
        {"account": "acct-002", "service": "svc-003", "day": "2026-01-31"}]


@pytest.fixture
def stars(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process imports the example's pipeline as the CLI and the workers do."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    monkeypatch.setenv("FANOUT_PIPELINES", "github_stars")


def schedule(tmp_path: Path, **table: Any) -> Schedule:
    [found] = parse_config({"schedules": {"s": {"every_s": 60, **table}}}, "fanout.toml",
                           tmp_path)
    return found


def test_items_and_items_file_become_the_runs_roots(tmp_path: Path, stars: None) -> None:
    given = schedule(tmp_path, pipeline="github_stars", items=REPOS)
    assert given.items == tuple(REPOS)
    assert given.run_options() == {"roots": REPOS}
    to_stage = schedule(tmp_path, pipeline="demo", items=DAYS, root_stage="metric_day",
                        batch_size=1, kill_switch="any_failed")
    assert to_stage.run_options() == {"roots": DAYS, "root_stage": "metric_day",
                                      "batch_size": 1, "kill_switch": AnyFailed()}
    (tmp_path / "repos.jsonl").write_text("\n".join(json.dumps(r) for r in REPOS))
    from_file = schedule(tmp_path, pipeline="github_stars", items_file="repos.jsonl")
    assert from_file.items_file == str(tmp_path / "repos.jsonl")  # relative to the config
    assert from_file.run_options() == {"roots": REPOS}
    # The file is read each time the schedule fires: an edit counts from the next run on.
    (tmp_path / "repos.jsonl").write_text(json.dumps(REPOS[:1]))
    assert from_file.run_options() == {"roots": REPOS[:1]}
    (tmp_path / "repos.jsonl").unlink()
    with pytest.raises(ConfigError, match="schedule 's': items_file: no such file"):
        from_file.run_options()


def test_an_items_file_is_relative_to_the_config_file(tmp_path: Path, stars: None) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "repos.json").write_text(json.dumps(REPOS))
    config = tmp_path / "conf" / "fanout.toml"
    config.write_text('[schedules.stars]\nevery_s = 60\npipeline = "github_stars"\n'
                      'items_file = "repos.json"\n')
    [found] = load_schedules(config)
    assert found.run_options() == {"roots": REPOS}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"pipeline": "github_stars"},
         "schedule 's': pipeline 'github_stars' has no roots function: give its root items "
         "(items = [...] or items_file = \"PATH\")"),
        ({"pipeline": "github_stars", "items": []},
         "schedule 's': items must be a non-empty list of root items, got []"),
        ({"pipeline": "github_stars", "items": "PrefectHQ/prefect"},
         "schedule 's': items must be a non-empty list of root items, got "
         "'PrefectHQ/prefect'"),
        ({"pipeline": "github_stars", "items": REPOS, "items_file": "repos.json"},
         "schedule 's': give items or items_file, not both"),
        ({"pipeline": "github_stars", "items_file": "gone.json"},
         "schedule 's': items_file: no such file '{tmp}/gone.json'"),
        ({"pipeline": "github_stars", "items_file": "bad.json"},
         "schedule 's': items_file {tmp}/bad.json: line 1 is not JSON"),
        ({"pipeline": "github_stars", "items_file": 3},
         "schedule 's': items_file must be a path, got 3"),
        ({"pipeline": "github_stars", "items": REPOS, "root_stage": "nope"},
         "schedule 's': pipeline 'github_stars' has no stage 'nope' (stages: fetch_stats)"),
        ({"pipeline": "demo", "root_stage": "services"},
         "schedule 's': root_stage is where items or items_file go: give one of them"),
        ({"pipeline": "demo", "items": DAYS, "root_stage": 2},
         "schedule 's': root_stage must be a stage name, got 2"),
    ],
)
def test_bad_items_name_the_schedule(tmp_path: Path, stars: None, table: dict[str, Any],
                                     message: str) -> None:
    (tmp_path / "bad.json").write_text("PrefectHQ/prefect\n")
    with pytest.raises(ConfigError) as caught:
        schedule(tmp_path, **table)
    assert str(caught.value).startswith(f"fanout.toml: {message.format(tmp=tmp_path)}")


def test_a_toml_date_is_no_json_item(tmp_path: Path) -> None:
    config = tmp_path / "fanout.toml"
    config.write_text('[schedules.s]\nevery_s = 60\npipeline = "demo"\nroot_stage = "services"\n'
                      "items = [2026-01-31]\n")
    with pytest.raises(ConfigError, match=r"schedule 's': items must be JSON values: Object of "
                                          r"type date is not JSON serializable"):
        load_schedules(config)


def test_a_bad_items_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "fanout.toml"
    config.write_text('[schedules.stars]\nevery_s = 60\npipeline = "github_stars"\n'
                      'items_file = "repos.json"\n')
    result = subprocess.run([sys.executable, "-m", "producers.cli", "schedules"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, **STARS_ENV, "FANOUT_CONFIG": str(config)})
    assert result.returncode == 2
    assert result.stderr == (f"fanout: error: {config}: schedule 'stars': items_file: no such "
                             f"file '{tmp_path / 'repos.json'}'\n")


@pytest.fixture
def beat(started_processes: list[subprocess.Popen[bytes]]) -> list[subprocess.Popen[bytes]]:
    return started_processes


def test_fanout_beat_fires_schedules_whose_roots_are_data(
    tmp_path: Path, vendor: VendorHandle, start_worker: WorkerFactory, redis_url: str,
    redis_client: redis.Redis, sink_path: Path, beat: list[subprocess.Popen[bytes]],
) -> None:
    """Two hourly schedules (a beat fires the latest slot at its start): the example's
    github_stars with its repos inline, and the demo's metric_day with two metric-days from
    a JSON lines file beside the config."""
    (tmp_path / "days.jsonl").write_text("\n".join(json.dumps(d) for d in DAYS) + "\n")
    config = tmp_path / "fanout.toml"
    config.write_text(
        f'[schedules.stars]\nevery_s = 3600\npipeline = "github_stars"\n'
        f'params = {{ base_url = "{vendor.url}" }}\nitems = {json.dumps(REPOS)}\n\n'
        f'[schedules.days]\nevery_s = 3600\npipeline = "demo"\n'
        f'params = {{ vendor_url = "{vendor.url}", http_retries = 0 }}\n'
        f'items_file = "days.jsonl"\nroot_stage = "metric_day"\n')
    start_worker(STARS_ENV)
    log = tmp_path / "beat.log"
    beat.append(subprocess.Popen(
        [sys.executable, "-m", "producers.cli", "beat"], stdout=log.open("wb"),
        stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **STARS_ENV, "FANOUT_REDIS_URL": redis_url,
             "FANOUT_CONFIG": str(config)}))

    def runs() -> dict[str, str]:
        ids = [str(r) for r in redis_client.zrange(keys.RUNS_INDEX, 0, -1)]
        return {run_id.split("-")[1]: run_id for run_id in ids}

    found = wait_for(lambda: len(runs()) == 2 and runs(), timeout_s=60, what="both schedules")
    ledger = Ledger(redis_client, 3600)
    assert {name: ledger.view.wait(run_id, timeout_s=60) for name, run_id in found.items()} \
        == {"stars": "succeeded", "days": "succeeded"}
    beat[0].send_signal(signal.SIGTERM)
    assert beat[0].wait(timeout=30) == 0

    stars = ledger.view.snapshot(found["stars"])
    assert stars is not None
    assert (stars.stages["fetch_stats"]["succeeded"], stars.rows_written) == (3, 0)
    assert [r["full_name"] for r in ledger.view.results(found["stars"])] == REPOS
    days = ledger.view.snapshot(found["days"])
    assert days is not None
    assert set(days.stages) == {"metric_day"}  # no account or service was listed
    assert days.stages["metric_day"]["succeeded"] == 2
    expected = []
    for item in DAYS:
        path = f"/accounts/{item['account']}/services/{item['service']}/metrics"
        metric = vendor.http.get(path, params={"day": item["day"]}).json()
        expected.append(("demo", item["account"], item["service"], metric["metric"],
                         item["day"], float(metric["value"]), found["days"]))
    assert sink_rows(sink_path) == expected
    stats = vendor.stats()["by_endpoint"]
    assert (stats.get("accounts", 0), stats["repos"], stats["metrics"]) == (0, 3, 2 + 2)
