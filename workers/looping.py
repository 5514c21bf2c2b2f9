"""Looping tasks (Prefect 1's ``LOOP`` signal), the part pipeline authors see.

A stage returns or raises ``Loop(payload)`` and fanout enqueues the same item again with that
payload and the next iteration number; the stage reads ``ctx.loop.payload`` and
``ctx.loop.iteration``. Each iteration is its own message with its own retries. How an
iteration is advanced exactly once is the ledger's (``lua/advance_loop.lua``); how a delayed
one waits is the scheduler's (``engine/scheduler.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_ITERATIONS = 1000


class Loop(Exception):
    """Return or raise this from a stage to run the same item again with ``payload``."""

    def __init__(self, payload: Any = None, delay_s: float = 0.0, message: str = "") -> None:
        super().__init__(message or f"loop with payload {payload!r}")
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        self.payload = payload
        self.delay_s = float(delay_s)


class LoopLimitExceeded(Exception):
    """An item looped more than its stage's ``max_iterations``."""


@dataclass(frozen=True)
class LoopState:
    """What a looping stage reads: ``ctx.loop.payload`` and ``ctx.loop.iteration`` (from 1)."""

    iteration: int = 1
    payload: Any = None
