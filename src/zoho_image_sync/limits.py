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
        self._waiting = 0  # callers in the locked path (holding or queued on the lock)

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
        if not self._waiting:
            # The common case, without a lock round: room in the window, nothing blocked.
            now = self.clock()
            self._expire(now)
            if len(self._sent) < self.limit and self._blocked_until <= now:
                cell = [now]
                self._sent.append(cell)
                return cell
        self._waiting += 1
        try:
            return await self._acquire_locked()
        finally:
            self._waiting -= 1

    async def _acquire_locked(self) -> list[float]:
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
    """A semaphore whose size can change while it is held (SIGHUP).

    ``acquire`` takes a free slot without suspending (the common case: one comparison per
    request); only a request that must wait gets a future, handed its slot by ``release``
    in arrival order.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def set_limit(self, limit: int) -> None:
        """Resize; holders above a smaller limit finish, newcomers wait."""
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled waiter gives its turn away
                self.in_use += 1
                waiter.set_result(None)

    async def acquire(self) -> None:
        """Take a slot, waiting (first come, first served) while all are held."""
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot, then cancelled before it could run
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back (exactly once per ``acquire``)."""
        self.in_use -= 1
        if self._waiters:
            self._wake()

    def hold(self) -> _Held:
        """``async with slots.hold():`` holds one slot for the duration of the block."""
        return _Held(self)


class _Held:
    __slots__ = ("_slots",)

    def __init__(self, slots: Slots) -> None:
        self._slots = slots

    async def __aenter__(self) -> None:
        await self._slots.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._slots.release()


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
        self.reset_hour = reset_hour  # also clears the cached day span
        self.day = day or self._today()
        self.spent = spent if day == self._today() or not day else 0
        self.exhausted_until: float | None = None

    @property
    def reset_hour(self) -> int:
        """The UTC hour at which a budget day starts."""
        return self._reset_hour

    @reset_hour.setter
    def reset_hour(self, hour: int) -> None:
        self._reset_hour = hour
        self._day_span = (0.0, 0.0)  # recomputed by the next _roll

    def _today(self, now: float | None = None) -> str:
        shifted = (self.wall() if now is None else now) - self.reset_hour * 3600
        return dt.datetime.fromtimestamp(shifted, dt.UTC).date().isoformat()

    def _roll(self) -> None:
        now = self.wall()
        start, end = self._day_span
        if not start <= now < end:
            # Once per budget day (or clock jump), not per request: date formatting showed
            # in the per-image profile.
            today = self._today(now)
            if today != self.day:
                self.day, self.spent = today, 0
            end = next_utc_midnight(now, self.reset_hour)
            self._day_span = (end - 86400.0, end)
        if self.exhausted_until is not None and now >= self.exhausted_until:
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

    def request(self) -> _Permit:
        """``async with gate.request() as arrived:`` holds a concurrency and a window slot.

        ``arrived()``: call it when the response headers are in, so the window counts the
        request at the latest moment Zoho can have counted it. A plain class, not an
        async generator: this runs once per request.
        """
        return _Permit(self)

    async def reconfigure(
        self, requests_per_minute: int, max_concurrent: int, daily: int, reset_hour: int
    ) -> None:
        """Apply new limits live."""
        self.window.set_limit(requests_per_minute)
        await self.slots.set_limit(max_concurrent)
        self.budget.limit = daily
        self.budget.reset_hour = reset_hour


class _Permit:
    """One request's pass through the ``ApiGate`` (see ``ApiGate.request``)."""

    __slots__ = ("_cell", "_gate")

    def __init__(self, gate: ApiGate) -> None:
        self._gate = gate
        self._cell: list[float] = [0.0]

    async def __aenter__(self) -> Callable[[], None]:
        gate = self._gate
        gate.budget.take()
        await gate.slots.acquire()
        try:
            # The send time is recorded after the slot is held, right before sending.
            self._cell = await gate.window.acquire()
        except BaseException:
            gate.slots.release()
            raise
        return self.arrived

    def arrived(self) -> None:
        """The response is in: count the request at this moment, not at its send."""
        now = self._gate.window.clock()
        if now > self._cell[0]:
            self._cell[0] = now

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.arrived()
        self._gate.slots.release()


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
