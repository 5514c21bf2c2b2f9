"""The ``ratelimit`` suite's per-key pipeline (``benchkeys``): every call carries its account's
API token and goes through the limit ``vendor-token`` under that token; bench workers load it
through ``FANOUT_PIPELINES=benchmarks.ratelimit_pipeline``.

The demo vendor lists each account with its token (its ``account_tokens`` knob) and counts and
limits requests per token (``key_rate_limit_rps``, the ``Authorization: Bearer`` header). The
stages are the demo's with the token carried along: the accounts listing (no token), one page
of an account's services (the suite keeps services within one page, so the request count is
exact), and a ``metric_day`` leaf with the demo leaf's settings (async, ``claim_batch`` 64,
retries) that writes the demo's record. The demo pipeline itself stays as it is: its outputs
are what the tests and the README show.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from workers.api import Pipeline, Record, StageContext
from workers.http import request_json, request_json_async
from workers.pipelines import demo as demo_module

PIPELINE = "benchkeys"
#: The per-key limit every call of the pipeline goes through, its key the account's token.
TOKEN_LIMIT = "vendor-token"

benchkeys = Pipeline(PIPELINE, vendor="demo")
benchkeys.params(demo_module.check_params)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@benchkeys.roots("accounts")
def list_accounts(params: dict[str, Any]) -> list[dict[str, str]]:
    listing = request_json("GET", f"{params['vendor_url']}/accounts",
                           retries=params["http_retries"])["accounts"]
    return [{"account": a["id"], "token": a["token"]} for a in listing]


@benchkeys.stage("accounts", maps_to="metric_day")
async def account(ctx: StageContext, item: dict[str, str]) -> list[dict[str, str]]:
    """The account's services (one page) x the days, each item with the account's token."""
    params = ctx.params
    page = await request_json_async(
        "GET", f"{params['vendor_url']}/accounts/{item['account']}/services",
        retries=params["http_retries"], limit=(TOKEN_LIMIT, item["token"]),
        headers=_auth(item["token"]),
    )
    days = demo_module.metric_days(params["end_day"], params["days"])
    return [{**item, "service": s["id"], "metric": s["metric"], "day": day}
            for s in page["services"] for day in days]


async def metric_day(ctx: StageContext, item: dict[str, str]) -> Record:
    params = ctx.params
    path = f"/accounts/{item['account']}/services/{item['service']}/metrics"
    data = await request_json_async(
        "GET", f"{params['vendor_url']}{path}", params={"day": item["day"]},
        retries=params["http_retries"], limit=(TOKEN_LIMIT, item["token"]),
        headers=_auth(item["token"]),
    )
    return Record("demo", item["account"], item["service"], data["metric"], item["day"],
                  float(data["value"]))


# The demo leaf's Stage with this body: claim_batch, retry policy, hooks and limits stay equal.
benchkeys.stages["metric_day"] = dataclasses.replace(
    demo_module.demo.stages["metric_day"], pipeline=PIPELINE, fn=metric_day
)
