"""The demo vendor: accounts -> services (cursor-paginated) -> one metric per service and day."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from workers.api import Loop, Pipeline, Record, StageContext, exponential
from workers.http import request_json, request_json_async
from workers.settings import ConfigError

DEFAULT_VENDOR_URL = "http://127.0.0.1:8765"
#: Every call to the vendor goes through this global limit, once it is set
#: (``fanout limits set demo-vendor --rate 50/s``); unset, it does not limit.
VENDOR_LIMIT = "demo-vendor"

demo = Pipeline("demo", vendor="demo")


@demo.params
def check_params(params: dict[str, Any]) -> dict[str, Any]:
    days = params.get("days", 7)
    if not isinstance(days, int) or isinstance(days, bool) or days < 1:
        raise ConfigError(f"--days must be a whole number >= 1, got {days!r}")
    end_day = params.get("end_day") or (dt.date.today() - dt.timedelta(days=1)).isoformat()
    try:
        dt.date.fromisoformat(end_day)
    except (TypeError, ValueError):
        raise ConfigError(f"--end-day must be YYYY-MM-DD, got {end_day!r}") from None
    retries = params.get("http_retries", 3)
    if not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"http_retries must be a whole number >= 0, got {retries!r}")
    vendor_url = params.get("vendor_url") or os.environ.get("FANOUT_DEMO_VENDOR_URL")
    return {
        **params,
        "days": days,
        "end_day": end_day,
        "http_retries": retries,
        "vendor_url": (vendor_url or DEFAULT_VENDOR_URL).rstrip("/"),
    }


def metric_days(end_day: str, days: int) -> list[str]:
    """The ``days`` days ending with ``end_day``, oldest first."""
    end = dt.date.fromisoformat(end_day)
    return [(end - dt.timedelta(days=back)).isoformat() for back in range(days - 1, -1, -1)]


def _get(params: dict[str, Any], path: str, **query: Any) -> Any:
    return request_json(
        "GET", f"{params['vendor_url']}{path}", params=query or None,
        retries=params["http_retries"], limit=VENDOR_LIMIT,
    )


async def _fetch(params: dict[str, Any], path: str, **query: Any) -> Any:
    """``_get`` for the async stages: a claimed batch's calls are in flight together."""
    return await request_json_async(
        "GET", f"{params['vendor_url']}{path}", params=query or None,
        retries=params["http_retries"], limit=VENDOR_LIMIT,
    )


@demo.roots("accounts")
def list_accounts(params: dict[str, Any]) -> list[dict[str, str]]:
    return [{"account": a["id"]} for a in _get(params, "/accounts")["accounts"]]


@demo.stage("accounts", maps_to="services")
async def account(ctx: StageContext, item: dict[str, str]) -> Loop | None:
    """One page of an account's services per iteration: the page fans out at once, and the
    cursor loops to the next page. A failed page is retried alone; earlier pages stay done."""
    query = {"cursor": ctx.loop.payload} if ctx.loop.payload else {}
    page = await _fetch(ctx.params, f"/accounts/{item['account']}/services", **query)
    ctx.map("services", [
        {"account": item["account"], "service": s["id"], "metric": s["metric"]}
        for s in page["services"]
    ])
    return Loop(page["next_cursor"]) if page.get("next_cursor") else None


# A service's days are cheap to list: a task carries up to 16 services (those that wait for
# this worker's idle threads), so a run's fan-out is not one Celery delivery per service.
@demo.stage("services", maps_to="metric_day", claim_batch=16)
def service(ctx: StageContext, item: dict[str, str]) -> list[dict[str, str]]:
    return [{**item, "day": day} for day in metric_days(ctx.params["end_day"], ctx.params["days"])]


# A failed metric-day is tried again up to 3 times, 0.5 s, 1 s, 2 s later (+/- 50%), after the
# HTTP client's own retries (``http_retries``); a vendor 4xx fails it at once. A task carries up
# to 64 of them, in flight together (fewer when the worker's in-flight bound, shared by its
# threads, is smaller): one Celery message, ledger call and sink commit for the lot.
@demo.stage("metric_day", claim_batch=64, retries=3, retry_delay_s=exponential(0.5, 2, 30),
            retry_jitter=0.5)
async def metric_day(ctx: StageContext, item: dict[str, str]) -> Record:
    path = f"/accounts/{item['account']}/services/{item['service']}/metrics"
    data = await _fetch(ctx.params, path, day=item["day"])
    return Record("demo", item["account"], item["service"], data["metric"], item["day"],
                  float(data["value"]))


# An async report per account and day: create it, then poll with a delay until it is ready.
demo_report = Pipeline("demo_report", vendor="demo-report")
demo_report.params(check_params)


@demo_report.roots("accounts")
def list_report_accounts(params: dict[str, Any]) -> list[dict[str, str]]:
    return list(list_accounts(params))


@demo_report.stage("accounts", maps_to="report")
def report_days(ctx: StageContext, item: dict[str, str]) -> list[dict[str, str]]:
    days = metric_days(ctx.params["end_day"], ctx.params["days"])
    return [{"account": item["account"], "day": day} for day in days]


@demo_report.stage("report")
def report(ctx: StageContext, item: dict[str, str]) -> Loop | list[Record]:
    """Iteration 1 creates the report; later ones poll it until it is ready."""
    base, delay_s = ctx.params["vendor_url"], float(ctx.params.get("poll_delay_s", 0.5))
    retries = ctx.params["http_retries"]
    if ctx.loop.payload is None:
        created = request_json("POST", f"{base}/reports", json=item, retries=retries,
                               limit=VENDOR_LIMIT)
        return Loop(created["report_id"], delay_s=delay_s)
    polled = request_json("GET", f"{base}/reports/{ctx.loop.payload}", retries=retries,
                          limit=VENDOR_LIMIT)
    if polled["status"] != "ready":
        return Loop(ctx.loop.payload, delay_s=delay_s)
    return [Record("demo-report", item["account"], row["service"], row["metric"], item["day"],
                   float(row["value"])) for row in polled["rows"]]
