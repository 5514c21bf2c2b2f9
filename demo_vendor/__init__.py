"""The bundled demo vendor API: an asyncio HTTP/1.1 server that fanout's
tests, demo and benchmarks harvest from (stdlib only by default; aiohttp with
``--server aiohttp``).

Run it with ``python -m demo_vendor serve --port 0``; compute expected
values in-process with the pure helpers re-exported here.
"""

from .app import VendorApp, VendorServer, serve, start_vendor
from .config import KNOBS, ConfigError, VendorConfig
from .data import (
    DEFAULT_METRICS,
    account_id,
    account_ids,
    account_token,
    accounts,
    decode_cursor,
    encode_cursor,
    fault_hit,
    fib,
    metric_value,
    report_id,
    report_rows,
    service_id,
    service_ids,
    service_metric,
    services,
    stars,
)

__all__ = [
    "DEFAULT_METRICS",
    "KNOBS",
    "ConfigError",
    "VendorApp",
    "VendorConfig",
    "VendorServer",
    "account_id",
    "account_ids",
    "account_token",
    "accounts",
    "decode_cursor",
    "encode_cursor",
    "fault_hit",
    "fib",
    "metric_value",
    "report_id",
    "report_rows",
    "serve",
    "service_id",
    "service_ids",
    "service_metric",
    "services",
    "stars",
    "start_vendor",
]
