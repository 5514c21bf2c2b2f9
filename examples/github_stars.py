"""Seed 004, Prefect 3's resilient pipeline, on fanout: GitHub stars with retries, a
concurrent map, a global rate limit named "github-api" and a one-day input cache.

    python examples/github_stars.py              # the demo vendor stands in for GitHub
    python examples/github_stars.py              # again: every fetch_stats is cached
    python examples/github_stars.py --base-url https://api.github.com

Its pipeline's roots are data (a list of repos), so from the command line it runs with
``--items``; producer and workers import it as the module ``github_stars`` (this folder on
the import path)::

    export PYTHONPATH=examples FANOUT_PIPELINES=github_stars
    fanout vendor serve &  fanout worker &
    echo '["PrefectHQ/prefect", "pydantic/pydantic"]' > repos.json
    fanout run github_stars --items repos.json --wait --json   # -p base_url=... for GitHub
    fanout results RUN                                          # what each repo returned

Prefect's ``prefect gcl create github-api --limit 60 --slot-decay-per-second 0.016`` is
``fanout limits set github-api --rate 60/h --burst 60``; this script sets it when it is missing.
It starts what it needs: the embedded Redis (or FANOUT_REDIS_URL), the demo vendor unless a
base URL is given, and a worker that imports this file's pipeline.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from workers.api import Pipeline, StageContext, rate_limit_async
from workers.http import request_json_async

REPOS = ["PrefectHQ/prefect", "pydantic/pydantic", "huggingface/transformers"]

flow = Pipeline("github_stars")
#: Where ``fanout run`` sends it without ``-p base_url=...``: the demo vendor.
DEFAULT_BASE_URL = "http://127.0.0.1:8765"


@flow.params
def check_params(params: dict[str, Any]) -> dict[str, Any]:
    """``base_url``, else ``--vendor-url``, else FANOUT_DEMO_VENDOR_URL, else the demo
    vendor's default address."""
    base_url = (params.get("base_url") or params.get("vendor_url")
                or os.environ.get("FANOUT_DEMO_VENDOR_URL") or DEFAULT_BASE_URL)
    return {**params, "base_url": str(base_url).rstrip("/")}


@flow.stage("fetch_stats", retries=3, cache="inputs", cache_ttl_s=24 * 3600)
async def fetch_stats(ctx: StageContext, github_repo: str) -> dict[str, Any]:
    """Task 1: Fetch the statistics for a GitHub repo (an ``async def``: the repos' calls
    wait together on the worker's event loop, the limit's waits too)"""
    await rate_limit_async("github-api")
    stats: dict[str, Any] = await request_json_async(
        "GET", f"{ctx.params['base_url']}/repos/{github_repo}", retries=0
    )
    return stats


def get_stars(repo_stats: dict[str, Any]) -> int:
    """Task 2: Get the number of stars from GitHub repo statistics"""
    return int(repo_stats["stargazers_count"])


def main(argv: list[str]) -> int:
    from producers.local import local_system
    from producers.trigger import start_run
    from workers.connections import get_redis
    from workers.engine.services import services
    from workers.limits import Limits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None, help="a real API (default: the demo vendor)")
    args = parser.parse_args(argv)
    here = str(Path(__file__).resolve().parent)
    with local_system(pipelines=["github_stars"], pythonpath=[here]) as system:
        limits = Limits(get_redis())
        if limits.get("github-api") is None:
            limits.set_limit("github-api", rate="60/h", burst=60)
        base_url = (args.base_url or system.vendor_url).rstrip("/")
        # Task 1 runs concurrently, one message per repo (Prefect's fetch_stats.map).
        run_id = start_run("github_stars", {"base_url": base_url}, roots=REPOS,
                           root_stage="fetch_stats")
        ledger = services().ledger
        status = ledger.view.wait(run_id, timeout_s=300)
        snapshot = ledger.view.snapshot(run_id)
    if status != "succeeded" or snapshot is None:
        print(f"run {run_id} ended {status}: fanout failures {run_id}", file=sys.stderr)
        return 1
    counts = snapshot.stages["fetch_stats"]
    print(f"fetch_stats: {counts['succeeded']} fetched, {counts['cached']} cached, "
          f"{counts['retried']} retried")
    stars = [get_stars(stats) for stats in ledger.view.results(run_id)]
    for repo, star_count in zip(REPOS, stars, strict=True):
        print(f"{repo}: {star_count} stars")
    return 0


if __name__ == "__main__":
    from producers.local import run_example

    raise SystemExit(run_example(main))
