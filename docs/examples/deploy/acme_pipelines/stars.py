"""Stars of a list of repositories, one message per repository, one row each in the sink.

    PYTHONPATH=docs/examples/deploy FANOUT_PIPELINES=acme_pipelines.stars fanout worker
    PYTHONPATH=docs/examples/deploy FANOUT_PIPELINES=acme_pipelines.stars \
        fanout run acme_stars --vendor-url http://127.0.0.1:8765 --wait
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from workers.api import Pipeline, Record, StageContext
from workers.http import request_json
from workers.settings import ConfigError

REPOS = ["PrefectHQ/prefect", "pydantic/pydantic", "celery/celery"]

stars = Pipeline("acme_stars")


@stars.params
def check_params(params: dict[str, Any]) -> dict[str, Any]:
    """Run in the producer: a bad parameter stops `fanout run` (one line, exit 2)."""
    repos = params.get("repos", REPOS)
    if not (isinstance(repos, list) and all(isinstance(r, str) and "/" in r for r in repos)):
        raise ConfigError(f"repos must be a list of OWNER/NAME, got {repos!r}")
    vendor_url = params.get("vendor_url") or "https://api.github.com"
    return {**params, "repos": repos, "vendor_url": vendor_url.rstrip("/"),
            "day": params.get("day") or dt.date.today().isoformat()}


@stars.roots("repo")
def list_repos(params: dict[str, Any]) -> list[str]:
    """Run in the producer: the run's root items, one message each."""
    return list(params["repos"])


@stars.stage("repo", retries=3, retry_delay_s=[1, 5, 30])
def repo(ctx: StageContext, full_name: str) -> Record:
    """Run in a worker: one repository's stars, as one row of the sink."""
    owner, name = full_name.split("/", 1)
    data = request_json("GET", f"{ctx.params['vendor_url']}/repos/{owner}/{name}", retries=0)
    return Record("acme", owner, name, "stars", ctx.params["day"],
                  float(data["stargazers_count"]))
