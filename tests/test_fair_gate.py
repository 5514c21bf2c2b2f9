"""The turns of a worker process's async items (``workers/fair_gate.py``): round-robin between
runs, weighted, and a limit found from how long turns are held and the loop's lag. The gate
end to end (a small run's items beside a backfill's) is in test_fair_share.py and the
``fairshare`` benchmark."""

from __future__ import annotations

import asyncio
import collections

import pytest

from workers.fair_gate import BUSY_LAG_S, CUT_GAP_TICKS, FLOOR, FairGate, LimitFinder


async def _order_of_turns(gate: FairGate, queued: list[tuple[str, int]]) -> list[str]:
    """Queue one item per entry (run, weight) behind a turn already held, then let one
    through at a time; the runs in the order they got their turns."""
    got: list[str] = []

    async def item(run_id: str, weight: int) -> None:
        async with gate.turn(run_id, weight):
            got.append(run_id)
            await asyncio.sleep(0)

    await gate.acquire("holder")
    tasks = [asyncio.create_task(item(r, w)) for r, w in queued]
    await asyncio.sleep(0)  # every item is queued now
    assert gate.waiting == len(queued)
    gate.release()
    await asyncio.gather(*tasks)
    return got


def test_turns_go_round_robin_between_the_runs_that_wait() -> None:
    gate = FairGate(bound=10, limit=1)
    queued = [("backfill", 1)] * 6 + [("daily", 1)] * 2
    got = asyncio.run(_order_of_turns(gate, queued))
    # The daily run queued behind six of the backfill's items gets every other turn.
    assert got == ["backfill", "daily", "backfill", "daily", "backfill", "backfill",
                   "backfill", "backfill"]
    assert (gate.held, gate.waiting) == (0, 0)
    assert (gate._weight, gate._credit) == ({}, {})  # runs with nothing waiting are forgotten


def test_a_runs_weight_is_its_share_of_the_turns() -> None:
    gate = FairGate(bound=10, limit=1)
    queued = [("backfill", 1)] * 8 + [("daily", 3)] * 6
    got = asyncio.run(_order_of_turns(gate, queued))
    first_eight = got[:8]
    assert first_eight.count("daily") == 6 and first_eight.count("backfill") == 2


def test_a_cancelled_waiter_leaves_the_queue_and_a_cancelled_turn_is_handed_on() -> None:
    async def scenario() -> tuple[int, int, list[str]]:
        gate = FairGate(bound=10, limit=1)
        got: list[str] = []
        await gate.acquire("holder")
        gone = asyncio.create_task(gate.acquire("a"))
        given = asyncio.create_task(gate.acquire("b"))

        async def last() -> None:
            async with gate.turn("c"):
                got.append("c")

        after = asyncio.create_task(last())
        await asyncio.sleep(0)
        gone.cancel()  # cancelled while it waits: it leaves the queue
        await asyncio.sleep(0)
        gate.release()  # the turn goes to b
        given.cancel()  # ... which is cancelled before it runs: the turn goes on to c
        await asyncio.gather(gone, given, return_exceptions=True)
        await after
        return gate.held, gate.waiting, got

    assert asyncio.run(scenario()) == (0, 0, ["c"])


def test_a_higher_limit_lets_waiting_items_in_at_once() -> None:
    async def scenario() -> tuple[int, int]:
        gate = FairGate(bound=100, limit=2)
        for _ in range(2):
            await gate.acquire("a")
        waiters = [asyncio.create_task(gate.acquire("b")) for _ in range(5)]
        await asyncio.sleep(0)
        gate.set_limit(5)
        await asyncio.sleep(0)
        done = sum(w.done() for w in waiters)
        gate.set_limit(1000)  # never above the bound
        return done, gate.limit

    assert asyncio.run(scenario()) == (3, 100)


def _waiting_gate(limit: int, bound: int = 100_000) -> FairGate:
    """A gate whose turns are all taken, with more items waiting than it will ever let in
    (futures of a loop that does not run: only the counts matter here)."""
    gate = FairGate(bound, limit)
    gate.held = limit
    loop = asyncio.new_event_loop()
    gate._waiting["run"] = collections.deque(loop.create_future() for _ in range(5000))
    return gate


def test_the_limit_doubles_while_nothing_has_ended_and_the_loop_is_idle() -> None:
    gate = _waiting_gate(8)
    finder = LimitFinder(gate)
    for expected in (16, 32, 64):
        finder.step(0.0, None)
        gate.held = gate.limit
        assert gate.limit == expected


def test_turns_slowed_on_a_busy_loop_cut_the_limit_and_end_the_doubling() -> None:
    gate = _waiting_gate(400)
    finder = LimitFinder(gate)
    finder.step(0.0, 0.02)  # unslowed: 20 ms a turn
    assert gate.limit == 800
    gate.set_limit(400)
    gate.held = 400
    for _ in range(CUT_GAP_TICKS):  # turns of 1 s now, 50x slowed, on a loop 7 ms late
        finder.step(0.007, 1.0)  # neither idle nor busy: the limit stays
    assert gate.limit == 400
    limits = []
    for _ in range(CUT_GAP_TICKS + 3):  # ... and on a loop 30 ms late
        finder.step(BUSY_LAG_S * 3, 1.0)
        limits.append(gate.limit)
    # A cut by 1/8 once the lag's median shows it (3 of 5 ticks: one stall is no trend),
    # the next once the turns held before it have ended (1 s: 10 ticks).
    assert limits == [400, 400] + [350] * CUT_GAP_TICKS + [350 - 350 // 8]
    assert not finder.slow_start
    # Unslowed again (a moving average: some ticks on): it grows by 1/16, no more doubling.
    for _ in range(40):
        finder.step(0.007, 0.02)
    gate.held = gate.limit
    before = gate.limit
    finder.step(0.007, 0.02)
    assert gate.limit == before + max(1, before // 16)
    # On a loop idle for 5 ticks it grows by 1/4, slowed turns or not.
    for _ in range(4):
        finder.step(0.0, 1.0)
    before = gate.limit
    finder.step(0.0, 1.0)
    assert gate.limit == before + before // 4


def test_a_slower_vendor_on_an_idle_loop_cuts_nothing() -> None:
    """Turns held longer because the vendor answers slower (or items wait there for a
    limit's turn), not because the process is busy: fewer turns would only lower the
    throughput and keep the items behind them waiting, so the limit only grows."""
    gate = _waiting_gate(200)
    finder = LimitFinder(gate)
    finder.slow_start = False
    finder.step(0.007, 0.2)  # 200 ms a turn, unslowed: it grows by 1/16
    grown = gate.limit
    assert grown == 200 + 200 // 16
    limits = []
    for _ in range(8):  # 5x slower, on an idle loop
        finder.step(0.001, 1.0)
        limits.append(gate.limit)
    assert limits[:4] == [grown] * 4  # until the loop has been idle for 5 ticks
    assert limits[4:] == [265, 331, 413, 516]  # + 1/4 a tick from 212


@pytest.mark.parametrize("start", [9, 16])
def test_the_limit_never_goes_below_its_floor(start: int) -> None:
    gate = _waiting_gate(start)
    finder = LimitFinder(gate)
    finder.step(0.0, 0.01)
    for _ in range(150):  # a cut every 10 ticks, within the 200 ticks its unslowed time lasts
        finder.step(1.0, 5.0)
    assert gate.limit == FLOOR
