"""The rolling window never admits more than the limit in any window span."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiolimiter import AsyncLimiter

from zoho_image_sync.errors import BudgetExhausted
from zoho_image_sync.limits import DailyBudget, RollingWindow, Slots, next_utc_midnight
from zoho_image_sync.simulator.records import max_arrivals_in_window


async def test_rolling_window_is_exact_where_a_token_bucket_is_not() -> None:
    limit, window = 10, 0.4
    # A plain bucket of `limit` per window lets ~2x through in one window span.
    bucket = AsyncLimiter(limit, window)
    sent: list[float] = []
    for _ in range(2 * limit):
        await bucket.acquire()
        sent.append(time.monotonic())
    assert max_arrivals_in_window(sent, window) > limit

    rw = RollingWindow(limit, window=window, margin=0.0)
    sent = []
    for _ in range(3 * limit):
        await rw.acquire()
        sent.append(time.monotonic())
    assert max_arrivals_in_window(sent, window) <= limit
    # ... and it does not leave the limit unused: 3 windows' worth in about 2 windows.
    assert sent[-1] - sent[0] < 2 * window + 0.3


async def test_block_for_pauses_everyone() -> None:
    rw = RollingWindow(100, window=60)
    rw.block_for(0.2)
    t0 = time.monotonic()
    admitted: list[float] = []

    async def caller() -> None:
        await rw.acquire()
        admitted.append(time.monotonic() - t0)

    await asyncio.gather(*(caller() for _ in range(3)))
    assert len(admitted) == 3 and min(admitted) >= 0.19


async def test_block_for_extended_while_callers_wait() -> None:
    rw = RollingWindow(100, window=60)
    rw.block_for(0.1)
    t0 = time.monotonic()
    waiting = asyncio.ensure_future(rw.acquire())
    await asyncio.sleep(0)  # it is now waiting on the first block
    rw.block_for(0.3)  # a second 429 arrives meanwhile: the later end wins
    await waiting
    assert time.monotonic() - t0 >= 0.29


async def test_slots_resize_live() -> None:
    slots = Slots(1)
    entered = asyncio.Event()
    release = asyncio.Event()
    all_in = asyncio.Event()
    inside = 0

    async def holder() -> None:
        nonlocal inside
        async with slots.hold():
            inside += 1
            entered.set()
            if inside == 3:
                all_in.set()
            await release.wait()

    tasks = [asyncio.create_task(holder()) for _ in range(3)]
    await entered.wait()
    assert slots.in_use == 1
    await slots.set_limit(3)
    async with asyncio.timeout(2):
        await all_in.wait()
    assert slots.in_use == 3
    release.set()
    await asyncio.gather(*tasks)
    assert inside == 3 and slots.in_use == 0


def test_daily_budget_rolls_over_at_utc_midnight() -> None:
    now = [1_700_000_000.0]
    b = DailyBudget(2, wall=lambda: now[0])
    b.take()
    b.take()
    assert b.remaining == 0
    with pytest.raises(BudgetExhausted) as info:
        b.take()
    assert info.value.resume_at == next_utc_midnight(now[0])
    now[0] = next_utc_midnight(now[0]) + 1
    assert b.remaining == 2
    b.exhaust()
    assert b.remaining == 0


def test_budget_day_starts_at_the_configured_utc_hour() -> None:
    import datetime as dt

    t = dt.datetime(2026, 12, 4, 21, 30, tzinfo=dt.UTC).timestamp()
    assert next_utc_midnight(t) == dt.datetime(2026, 12, 5, tzinfo=dt.UTC).timestamp()
    assert next_utc_midnight(t, 22) == dt.datetime(2026, 12, 4, 22, tzinfo=dt.UTC).timestamp()
    assert next_utc_midnight(t, 8) == dt.datetime(2026, 12, 5, 8, tzinfo=dt.UTC).timestamp()
    now = [t]
    b = DailyBudget(1, wall=lambda: now[0], reset_hour=22)
    b.take()
    assert b.remaining == 0
    now[0] = dt.datetime(2026, 12, 4, 22, 0, 1, tzinfo=dt.UTC).timestamp()
    assert b.remaining == 1


def test_budget_day_follows_a_reset_hour_changed_live_and_a_clock_set_back() -> None:
    import datetime as dt

    now = [dt.datetime(2026, 12, 4, 21, 30, tzinfo=dt.UTC).timestamp()]
    b = DailyBudget(1, wall=lambda: now[0])
    b.take()
    assert b.remaining == 0
    # A reload moves the day's start to 22:00 UTC: 21:30 now belongs to the budget day
    # that began at 22:00 the evening before, which has another count.
    b.reset_hour = 22
    assert b.remaining == 1
    b.take()
    assert b.remaining == 0
    # The clock set back by a day: another budget day, another count.
    now[0] -= 86400
    assert b.remaining == 1


async def test_slots_serve_waiters_in_order_and_a_cancelled_waiter_loses_nothing() -> None:
    slots = Slots(1)
    await slots.acquire()
    order: list[str] = []

    async def waiter(name: str) -> None:
        await slots.acquire()
        order.append(name)
        slots.release()

    first = asyncio.create_task(waiter("first"))
    doomed = asyncio.create_task(waiter("doomed"))
    last = asyncio.create_task(waiter("last"))
    await asyncio.sleep(0)  # all three are queued (no timing: one loop turn)
    assert len(slots._waiters) == 3
    doomed.cancel()
    slots.release()
    async with asyncio.timeout(2):
        await asyncio.gather(first, last)
    assert doomed.cancelled()
    assert order == ["first", "last"]
    assert slots.in_use == 0

    # Handed a slot and cancelled before it could run: the slot comes back.
    await slots.acquire()
    granted = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    slots.release()  # hands the slot to `granted`...
    granted.cancel()  # ...which is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await granted
    assert slots.in_use == 0
    async with asyncio.timeout(2):
        async with slots.hold():
            assert slots.in_use == 1
    assert slots.in_use == 0


async def test_rolling_window_fast_path_still_counts_and_blocks() -> None:
    rw = RollingWindow(3, window=60, margin=0.0)
    cells = [await rw.acquire() for _ in range(3)]
    assert len(cells) == 3 and len(rw.snapshot(time.time())) == 3
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await rw.acquire()  # the fourth waits for the window, fast path or not


async def test_a_caller_queued_for_the_window_is_not_overtaken_by_a_newcomer() -> None:
    now = [0.0]
    rw = RollingWindow(2, window=10, margin=0, clock=lambda: now[0])
    await rw.acquire()  # one place left
    await rw._lock.acquire()  # a caller in the locked path (say, waiting out a 429)
    got: list[str] = []

    async def queued() -> None:
        await rw.acquire()
        got.append("queued")

    q = asyncio.create_task(queued())  # arrived first: waits for the lock
    await asyncio.sleep(0)
    rw._lock.release()  # the holder is done: `queued` is woken but has not run yet
    newcomer = rw.acquire()  # a newcomer running in that gap (the same loop turn)
    try:
        newcomer.send(None)  # it must queue (suspend), not take the place at once
    except StopIteration:
        got.append("newcomer admitted at once")
    newcomer.close()
    async with asyncio.timeout(2):
        await q
    assert got == ["queued"]  # ...and the caller who came first got the last place
