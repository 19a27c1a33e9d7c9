"""Rate, concurrency and budget limits, as Zoho counts them.

Zoho counts arrivals (rejected ones included) over a rolling minute. A token bucket
such as ``aiolimiter.AsyncLimiter(100, 60)`` admits a full burst and then refills, so
up to ~2x the limit can land in one 60 s span. ``RollingWindow`` instead keeps the
send time of each of the last ``limit`` requests and admits the next one only when the
oldest has left the window (plus a margin for latency jitter): no 60 s span ever holds
more than ``limit`` of our requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

from aiolimiter import AsyncLimiter

from .errors import BudgetExhausted


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential back-off with jitter: ``base`` doubling per attempt, capped, x0.5-1.5."""
    return min(base * 2.0 ** (attempt - 1), cap) * random.uniform(0.5, 1.5)


class RollingWindow:
    """At most ``limit`` acquisitions in any ``window`` seconds (exact, not a bucket)."""

    def __init__(
        self,
        limit: int,
        window: float = 60.0,
        margin: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.margin = margin
        self.clock = clock
        # One mutable cell per request: its send time, moved later when the response
        # arrives (an upper bound on when Zoho counted it; a fresh TLS handshake can take
        # longer than the margin).
        self._sent: deque[list[float]] = deque()
        self._lock = asyncio.Lock()
        self._blocked_until = 0.0
        self._changed = asyncio.Event()

    def set_limit(self, limit: int) -> None:
        """Change the limit live (SIGHUP); the window history is kept, a waiter re-checks."""
        self.limit = limit
        self._changed.set()

    def block_for(self, seconds: float) -> None:
        """Admit nothing for ``seconds`` (the server told us to slow down)."""
        self._blocked_until = max(self._blocked_until, self.clock() + seconds)

    def _expire(self, now: float) -> None:
        horizon = now - self.window - self.margin
        while self._sent and self._sent[0][0] <= horizon:
            self._sent.popleft()

    def snapshot(self, wall_now: float) -> list[float]:
        """The counted requests as wall-clock times, to carry the window across restarts."""
        now = self.clock()
        self._expire(now)
        return [round(wall_now - (now - cell[0]), 3) for cell in self._sent]

    def restore(self, wall_times: list[float], wall_now: float) -> None:
        """Count requests an earlier process sent (``snapshot`` of it)."""
        now = self.clock()
        cells = [[now - (wall_now - t)] for t in sorted(wall_times)]
        self._sent = deque(sorted([*cells, *self._sent], key=lambda c: c[0]))
        self._expire(now)

    async def acquire(self) -> list[float]:
        """Wait until one more request fits in every rolling window, count it, return its cell.

        Set ``cell[0]`` to the arrival time of the response once known (``ApiGate`` does).
        """
        async with self._lock:
            while True:
                now = self.clock()
                self._expire(now)
                wait = self._blocked_until - now
                if len(self._sent) >= self.limit:
                    # Enough of the oldest sends must leave the window first. Cells moved
                    # later are no longer in order: taking the latest of the first ones
                    # errs on the side of waiting.
                    k = len(self._sent) - self.limit + 1
                    latest = max(cell[0] for cell in itertools.islice(self._sent, k))
                    wait = max(wait, latest + self.window + self.margin - now)
                if wait <= 0:
                    break
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._changed.wait()
            cell = [self.clock()]
            self._sent.append(cell)
            return cell


class Slots:
    """A semaphore whose size can change while it is held (SIGHUP)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._cond = asyncio.Condition()

    async def set_limit(self, limit: int) -> None:
        """Resize; holders above a smaller limit finish, newcomers wait."""
        async with self._cond:
            self.limit = limit
            self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Hold one slot for the duration of the block."""
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_use < self.limit)
            self.in_use += 1
        try:
            yield
        finally:
            async with self._cond:
                self.in_use -= 1
                self._cond.notify()


def next_utc_midnight(now: float, hour: int = 0) -> float:
    """The epoch time of the next budget reset: ``hour``:00 UTC (midnight by default)."""
    shifted = dt.datetime.fromtimestamp(now - hour * 3600, dt.UTC).date()
    start = dt.datetime.combine(shifted + dt.timedelta(days=1), dt.time(), dt.UTC)
    return start.timestamp() + hour * 3600


class DailyBudget:
    """Our own count of Zoho API requests per budget day, and Zoho's word (code 45).

    A budget day starts at ``reset_hour``:00 UTC (Zoho's day for the organisation; midnight
    UTC unless configured otherwise).
    """

    def __init__(
        self,
        limit: int,
        wall: Callable[[], float] = time.time,
        spent: int = 0,
        day: str = "",
        reset_hour: int = 0,
    ) -> None:
        self.limit = limit
        self.wall = wall
        self.reset_hour = reset_hour
        self.day = day or self._today()
        self.spent = spent if day == self._today() or not day else 0
        self.exhausted_until: float | None = None

    def _today(self) -> str:
        shifted = self.wall() - self.reset_hour * 3600
        return dt.datetime.fromtimestamp(shifted, dt.UTC).date().isoformat()

    def _roll(self) -> None:
        today = self._today()
        if today != self.day:
            self.day, self.spent = today, 0
        if self.exhausted_until is not None and self.wall() >= self.exhausted_until:
            self.exhausted_until = None

    def next_reset(self) -> float:
        """When the current budget day ends."""
        return next_utc_midnight(self.wall(), self.reset_hour)

    def resume_at(self) -> float:
        """When requests may be sent again once the budget is spent (Zoho's 45, or ours)."""
        return self.exhausted_until or self.next_reset()

    @property
    def remaining(self) -> int:
        """Requests left today (0 while Zoho says the day's budget is spent)."""
        self._roll()
        if self.exhausted_until is not None:
            return 0
        return max(0, self.limit - self.spent)

    def take(self) -> None:
        """Count one request, or raise BudgetExhausted when none is left."""
        self._roll()
        if self.exhausted_until is not None or self.spent >= self.limit:
            raise BudgetExhausted("daily request budget spent", resume_at=self.resume_at())
        self.spent += 1

    def exhaust(self) -> float:
        """Zoho answered code 45: nothing more until the budget day resets."""
        self.exhausted_until = self.next_reset()
        return self.exhausted_until


class ApiGate:
    """Everything a Zoho API request must pass: budget, concurrency, rolling window."""

    def __init__(
        self,
        requests_per_minute: int,
        max_concurrent: int,
        budget: DailyBudget,
        window: float = 60.0,
        margin: float = 0.5,
    ) -> None:
        self.window = RollingWindow(requests_per_minute, window=window, margin=margin)
        self.slots = Slots(max_concurrent)
        self.budget = budget

    @contextlib.asynccontextmanager
    async def request(self) -> AsyncIterator[Callable[[], None]]:
        """Hold a concurrency slot and a window slot for one request.

        Yields ``arrived()``: call it when the response headers are in, so the window counts
        the request at the latest moment Zoho can have counted it.
        """
        self.budget.take()
        async with self.slots.hold():
            # The send time is recorded after the slot is held, right before sending.
            cell = await self.window.acquire()
            clock = self.window.clock

            def arrived() -> None:
                cell[0] = max(cell[0], clock())

            try:
                yield arrived
            except BaseException:
                arrived()
                raise

    async def reconfigure(
        self, requests_per_minute: int, max_concurrent: int, daily: int, reset_hour: int
    ) -> None:
        """Apply new limits live."""
        self.window.set_limit(requests_per_minute)
        await self.slots.set_limit(max_concurrent)
        self.budget.limit = daily
        self.budget.reset_hour = reset_hour


class HostGate:
    """Per-host rate and concurrency for non-Zoho image hosts (url_map, image_url)."""

    def __init__(self, per_second: float, concurrency: int) -> None:
        self.per_second = per_second
        self.concurrency = concurrency
        self._hosts: dict[str, tuple[AsyncLimiter, Slots]] = {}

    def reconfigure(self, per_second: float, concurrency: int) -> None:
        """New limits apply to hosts met from now on."""
        self.per_second, self.concurrency = per_second, concurrency
        self._hosts.clear()

    @contextlib.asynccontextmanager
    async def request(self, url: str) -> AsyncIterator[None]:
        """Hold this host's slot and rate token for one request."""
        host = urlsplit(url).netloc.lower()
        if host not in self._hosts:
            # Bucket of one second's worth: a token bucket is fine for hosts we do not
            # owe an exact rolling-window guarantee.
            rate = max(1.0, self.per_second)
            self._hosts[host] = (
                AsyncLimiter(rate, rate / self.per_second),
                Slots(self.concurrency),
            )
        limiter, slots = self._hosts[host]
        async with slots.hold():
            await limiter.acquire()
            yield
