"""Deterministic demo data derived from a seed.

Everything here is a pure function of its arguments.  Values come from
blake2b digests (never ``hash()``, which is salted per process) so that two
servers started with the same seed — or a test computing expectations
in-process — always agree.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence

DEFAULT_METRICS: tuple[str, ...] = ("requests", "cpu_seconds", "storage_gb")

# Largest n served by the fib endpoints: fib(10000) has ~2090 digits, well
# under Python's 4300-digit int->str limit that json.dumps would trip over.
FIB_MAX_N = 10_000


def _digest_int(text: str) -> int:
    """A stable 64-bit integer for ``text``."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def unit_hash(text: str) -> float:
    """Map ``text`` to a stable float in [0, 1)."""
    return _digest_int(text) / 2**64


def account_id(n: int) -> str:
    return f"acct-{n:03d}"


def service_id(n: int) -> str:
    return f"svc-{n:03d}"


def account_ids(count: int) -> list[str]:
    return [account_id(i) for i in range(1, count + 1)]


def service_ids(count: int) -> list[str]:
    return [service_id(i) for i in range(1, count + 1)]


def account_token(account: str) -> str:
    """The API token of an account, as the listing gives it with ``account_tokens`` on."""
    return f"tok-{account}"


def accounts(count: int, tokens: bool = False) -> list[dict[str, str]]:
    """The ``/accounts`` listing for ``count`` accounts, with each one's token if ``tokens``."""
    listing = [{"id": account_id(i), "name": f"Account {i}"} for i in range(1, count + 1)]
    if tokens:
        for account in listing:
            account["token"] = account_token(account["id"])
    return listing


def _parse_numbered(value: str, prefix: str, count: int) -> int | None:
    # Accept only the canonical spelling ("acct-007", not "acct-7") so every
    # entity has exactly one id and one by_path key.
    if not value.startswith(prefix):
        return None
    digits = value[len(prefix) :]
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 12:
        return None
    n = int(digits)
    if not 1 <= n <= count or f"{prefix}{n:03d}" != value:
        return None
    return n


def account_number(value: str, count: int) -> int | None:
    """1-based number of account id ``value``, or None if it does not exist."""
    return _parse_numbered(value, "acct-", count)


def service_number(value: str, count: int) -> int | None:
    """1-based number of service id ``value``, or None if it does not exist."""
    return _parse_numbered(value, "svc-", count)


def service_metric(seed: int, account: str, service: str, metrics: Sequence[str]) -> str:
    """The metric name a service reports, picked from ``metrics`` by hash."""
    if not metrics:
        raise ValueError("metrics must not be empty")
    return metrics[_digest_int(f"{seed}|{account}|{service}") % len(metrics)]


def metric_value(seed: int, account: str, service: str, day: str) -> float:
    """The metric value for one service-day: 3 decimals, in [0, 1000)."""
    # Integer thousandths keep the value exact at 3 decimals and strictly
    # below 1000 (rounding a float could produce 1000.0).
    return (_digest_int(f"{seed}|{account}|{service}|{day}") % 1_000_000) / 1000


def services(seed: int, account: str, count: int, metrics: Sequence[str]) -> list[dict[str, str]]:
    """All services of ``account`` with their metric names."""
    return [
        {"id": sid, "metric": service_metric(seed, account, sid, metrics)}
        for sid in service_ids(count)
    ]


def report_rows(
    seed: int, account: str, day: str, count: int, metrics: Sequence[str]
) -> list[dict[str, object]]:
    """Rows of a finished report: one per service of ``account``."""
    return [
        {
            "service": sid,
            "metric": service_metric(seed, account, sid, metrics),
            "value": metric_value(seed, account, sid, day),
        }
        for sid in service_ids(count)
    ]


def report_id(account: str, day: str) -> str:
    """Deterministic report id for an (account, day) pair."""
    digest = hashlib.blake2b(f"report|{account}|{day}".encode(), digest_size=8)
    return f"rpt-{digest.hexdigest()}"


def fib(n: int) -> int:
    """fib(1) == fib(2) == 1; iterative so large n cannot blow the stack."""
    if n < 1:
        raise ValueError("n must be >= 1")
    a, b = 0, 1
    for _ in range(n - 1):
        a, b = b, a + b
    return b


def stars(seed: int, owner: str, name: str) -> int:
    """Deterministic stargazer count in [0, 200000)."""
    return _digest_int(f"{seed}|repo|{owner}/{name}") % 200_000


def fault_hit(seed: int, salt: str, key: str, rate: float) -> bool:
    """Whether path ``key`` is selected for fault ``salt`` ("err"/"stall")."""
    return rate > 0 and unit_hash(f"{seed}|{salt}|{key}") < rate


def encode_cursor(offset: int) -> str:
    """Opaque pagination cursor (URL-safe base64, no padding)."""
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """Offset encoded in ``cursor``; ValueError if it is not one of ours."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        # validate=True rejects stray characters instead of silently dropping them.
        raw = base64.b64decode(padded, altchars=b"-_", validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ValueError("bad cursor") from exc
    prefix, _, digits = raw.partition(":")
    if prefix != "offset" or not digits.isdigit():
        raise ValueError("bad cursor")
    return int(digits)
