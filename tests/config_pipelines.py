"""A pipeline whose stage settings the tests change in the config file (tests/test_config_file.py);
workers import this module (FANOUT_PIPELINES=config_pipelines). Each run's roots are given to
one stage. In Python every stage is declared with the defaults the config file then overrides:

- ``cfgtest.flaky`` (no retries) raises ValueError on the first n tries of item n, then
  returns n;
- ``cfgtest.leaf`` (claim_batch 1) returns its item;
- ``cfgtest.fetch`` (no limits) GETs ``/fib/N`` from the vendor, with no HTTP retries.
"""

from __future__ import annotations

from typing import Any

from workers.api import Pipeline, StageContext
from workers.http import request_json

cfgtest = Pipeline("cfgtest")


@cfgtest.stage("flaky", retry_on=ValueError)
def flaky(ctx: StageContext, n: int) -> int:
    if ctx.attempt <= n:
        raise ValueError(f"item {n} on try {ctx.attempt}")
    return n


@cfgtest.stage("leaf")
def leaf(ctx: StageContext, n: int) -> int:
    return n


@cfgtest.stage("fetch")
def fetch(ctx: StageContext, n: int) -> Any:
    return request_json("GET", f"{ctx.params['vendor_url']}/fib/{n}", retries=0)["value"]


def never_retry(exc: BaseException) -> bool:
    """A ``retry_if`` the config file names by its import path."""
    return False


def key_of(ctx: StageContext, item: Any) -> str:
    """A ``cache_key`` the config file names by its import path."""
    return str(item)
