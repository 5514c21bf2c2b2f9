"""A rate that finds the vendor's limit (``rate = "auto"``): AIMD, as TCP finds a path's
capacity, in pure arithmetic; ``lua/_limit_aimd.lua`` runs the same steps in Redis, shared by
every worker, and takes its constants from here (``limits.py`` passes them).

The state is the current rate (calls per second) and whether it is still in slow start.

- Slow start: the rate starts at ``START_RATE`` (within the floor and ceiling) and each
  success adds ``SLOW_START_GAIN``: a second of successes at rate r adds 0.7 r, so the rate
  about doubles each second until the vendor first refuses (a 429 or a 503).
- That first refusal halves it (``SLOW_START_CUT``, TCP's): doubling overshot the limit by up
  to 2x, so half of it is at or under the limit.
- Successes count only while calls queue for their turns (Redis's ``limit_gcra.lua`` checks
  that): a rate the callers do not use, because they are slower than it, proves nothing, and
  grown unused it would let a later burst far over the vendor's limit (RFC 7661).
- Then each success adds ``STEP / rate`` (``STEP`` per second of successes, whatever the rate)
  and each refusal cuts it to ``CUT`` of itself, at most once per ``CUT_WINDOW_S`` (the calls
  already in flight when the limit was crossed are refused too: one cut for all of them).

Why these constants, against an unannounced limit L (the issue's target: >= 85% of L with <=
3% of calls refused, following a halved L within 10 s). The rate saws between CUT x L and L:
with 0.85 it averages 92.5% of L (0.5, TCP's cut, would average 75%: too deep). Climbing back
at 4/s takes 0.15 L / 4 s, 1.9 s at L = 50: about one refused call (and those in flight) per
2 s, ~90 calls, ~1-2%. A smaller step refuses less but climbs slower after a cut; a larger
one refuses more. When L halves, one cut a second (0.85^4 = 0.52) brings the rate under the new
limit in 4-5 s. On a loaded machine the calls reach the vendor with jitter, and the first 429
comes below L: the saw's top is lower, which is why the climb is not slower (measured by the
``ratelimit`` benchmark's auto case: 3/s reached 72% of an unannounced 50/s at load average 6,
0.8% of calls refused before the drop). An auto limit has no headroom below its rate (the
fixed limits' 5%, throttle.HEADROOM): its rate already sits where the vendor's 429s put it.
With 4/s and no headroom the same case reached 88.3%, 2.69% refused, following a drop to
25/s in 4.5 s.
"""

from __future__ import annotations

from typing import NamedTuple

START_RATE = 10.0  # per second, moderate: within the floor and ceiling
SLOW_START_GAIN = 0.7  # per success in slow start: x2 per second of successes
SLOW_START_CUT = 0.5
STEP = 4.0  # per second of successes, after slow start
CUT = 0.85
CUT_WINDOW_S = 1.0
DEFAULT_CEILING = "1000/s"
DEFAULT_FLOOR = "1/s"


class State(NamedTuple):
    rate: float  # calls per second
    slow_start: bool
    last_cut_s: float  # server time of the last cut (0: none)


def start(floor: float, ceiling: float) -> State:
    return State(min(max(START_RATE, floor), ceiling), True, 0.0)


def grow(state: State, successes: int, floor: float, ceiling: float) -> State:
    """After ``successes`` calls the vendor answered (anything but 429/503)."""
    if successes <= 0:
        return state
    if state.slow_start:
        rate = state.rate + successes * SLOW_START_GAIN
    else:
        rate = state.rate + successes * STEP / state.rate
    return state._replace(rate=min(max(rate, floor), ceiling))


def cut(state: State, now_s: float, floor: float) -> State:
    """After a 429 or a 503 at ``now_s``: at most one cut per ``CUT_WINDOW_S``."""
    if now_s - state.last_cut_s < CUT_WINDOW_S:
        return state
    factor = SLOW_START_CUT if state.slow_start else CUT
    return State(max(state.rate * factor, floor), False, now_s)
