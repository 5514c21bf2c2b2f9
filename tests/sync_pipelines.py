"""The demo pipeline in its sync form, for the tests; workers import this module
(FANOUT_PIPELINES=sync_pipelines).

``demosync``: the demo's roots, params and ``services`` stage, with ``accounts`` and
``metric_day`` written as plain functions over ``request_json`` (the demo's are ``async def``
over ``request_json_async``): the same calls, the same records, run one after another on a
worker thread. Sync stages must keep working unchanged beside async ones.
"""

from __future__ import annotations

from typing import Any

from workers.api import Loop, Pipeline, Record, StageContext, exponential
from workers.pipelines import demo as demo_module

demosync = Pipeline("demosync", vendor="demo")
demosync.params(demo_module.check_params)
demosync.roots("accounts")(demo_module.list_accounts)
demosync.stage("services", maps_to="metric_day")(demo_module.service)


@demosync.stage("accounts", maps_to="services")
def account(ctx: StageContext, item: dict[str, str]) -> Loop | None:
    query = {"cursor": ctx.loop.payload} if ctx.loop.payload else {}
    page = demo_module._get(ctx.params, f"/accounts/{item['account']}/services", **query)
    ctx.map("services", [
        {"account": item["account"], "service": s["id"], "metric": s["metric"]}
        for s in page["services"]
    ])
    return Loop(page["next_cursor"]) if page.get("next_cursor") else None


@demosync.stage("metric_day", claim_batch=32, retries=3, retry_delay_s=exponential(0.5, 2, 30),
                retry_jitter=0.5)
def metric_day(ctx: StageContext, item: dict[str, str]) -> Record:
    path = f"/accounts/{item['account']}/services/{item['service']}/metrics"
    data: dict[str, Any] = demo_module._get(ctx.params, path, day=item["day"])
    return Record("demo", item["account"], item["service"], data["metric"], item["day"],
                  float(data["value"]))
