"""The Generic Cell Rate Algorithm (GCRA) as pure arithmetic; ``lua/limit_gcra.lua`` runs the
same steps atomically in Redis, on Redis server time.

The only state is the theoretical arrival time ``tat_s``: when the limit would next be idle if
every request so far had come exactly at the rate. A request of ``cost`` is allowed at ``now_s``
when ``max(tat_s, now_s) + (cost - burst) * T <= now_s`` (``T`` the emission interval), and
then moves ``tat_s`` to ``max(tat_s, now_s) + cost * T``. So ``burst`` requests pass at once,
the next waits one interval, and a stream at exactly the rate never waits. A ``tat_s`` in the
past means the same as none (use 0), which is why the Redis key may expire once ``tat_s`` has
passed. ``not_before_s`` is the limit's push-back (``lua/limit_backoff.lua``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# "60/h", "10/s", and with a multiple of the unit, "100/15m".
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([smhd])\s*$")


@dataclass(frozen=True)
class Rate:
    """``count`` requests per ``period_s`` seconds."""

    count: int
    period_s: float

    def __post_init__(self) -> None:
        if self.count < 1 or self.period_s <= 0:
            raise ValueError(f"a rate needs count >= 1 and period_s > 0, got {self!r}")

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``"COUNT/UNIT"`` with UNIT one of s, m, h, d, optionally a multiple: ``"100/15m"``."""
        match = _RATE.match(text) if isinstance(text, str) else None
        if not match or int(match[1]) < 1 or float(match[2] or 1) == 0:
            raise ValueError(
                f"bad rate {text!r}: expected COUNT/UNIT with UNIT one of s, m, h, d "
                "(e.g. '60/h', '10/s', '100/15m')"
            )
        multiple = float(match[2]) if match[2] else 1
        return cls(int(match[1]), multiple * UNIT_S[match[3]])

    @property
    def emission_interval_s(self) -> float:
        """The steady spacing between two requests."""
        return self.period_s / self.count

    def __str__(self) -> str:
        for unit, unit_s in reversed(UNIT_S.items()):
            multiple, rest = divmod(self.period_s, unit_s)
            if not rest:
                return f"{self.count}/{int(multiple) if multiple != 1 else ''}{unit}"
        return f"{self.count}/{self.period_s!r}s"


class Decision(NamedTuple):
    allowed: bool
    tat_s: float  # the state to store: moved on when allowed, unchanged when refused
    wait_s: float  # allowed: sleep this long first (0: at once); refused: until it would pass


def decide(
    tat_s: float,
    now_s: float,
    rate: Rate,
    burst: int = 1,
    cost: int = 1,
    not_before_s: float = 0.0,
    max_wait_s: float = 0.0,
) -> Decision:
    """One GCRA step (``lua/limit_gcra.lua`` does the same). ``tat_s`` is the stored state (0
    when there is none); nothing passes before ``not_before_s`` (a push-back after a vendor's
    429); a refusal leaves the state as it was. A turn at most ``max_wait_s`` away is reserved:
    allowed, with the wait to sleep first, so waiting callers are spaced at the rate."""
    if not 1 <= cost <= burst:
        raise ValueError(f"need 1 <= cost <= burst (a larger cost never passes), "
                         f"got cost={cost}, burst={burst}")
    interval_s = rate.emission_interval_s
    not_before_s = max(not_before_s, now_s)
    base_s = max(tat_s, not_before_s)
    allow_at_s = max(base_s + (cost - burst) * interval_s, not_before_s)
    if allow_at_s - now_s > max_wait_s:
        return Decision(False, tat_s, allow_at_s - now_s)
    return Decision(True, base_s + cost * interval_s, allow_at_s - now_s)
