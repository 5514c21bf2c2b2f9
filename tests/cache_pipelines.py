"""A cached pipeline for the tests; workers import this module (FANOUT_PIPELINES).

``listing`` (cached) fans out an account's services and days to ``metric`` (cached, a
short TTL), which fetches one metric-day from the demo vendor and returns a Record."""

from __future__ import annotations

from typing import Any

from workers.api import Pipeline, Record, StageContext
from workers.http import request_json
from workers.pipelines.demo import metric_days

#: Shorter than the listing's default day, and longer than any run: test_cache moves the
#: entries' expiry instead of waiting it out.
CACHE_TTL_S = 600.0

cachetest = Pipeline("cachetest")


def _get(ctx: StageContext, path: str, **query: Any) -> Any:
    return request_json("GET", f"{ctx.params['vendor_url']}{path}", params=query or None,
                        retries=0)


@cachetest.stage("listing", maps_to="metric", cache="inputs")
def listing(ctx: StageContext, account: str) -> list[dict[str, str]]:
    services = _get(ctx, f"/accounts/{account}/services")["services"]
    return [{"account": account, "service": s["id"], "day": day}
            for s in services for day in metric_days(ctx.params["end_day"], 2)]


@cachetest.stage("metric", cache="inputs", cache_ttl_s=CACHE_TTL_S, claim_batch=4)
def metric(ctx: StageContext, item: dict[str, str]) -> Record:
    path = f"/accounts/{item['account']}/services/{item['service']}/metrics"
    data = _get(ctx, path, day=item["day"])
    return Record("cachetest", item["account"], item["service"], data["metric"], item["day"],
                  float(data["value"]))
