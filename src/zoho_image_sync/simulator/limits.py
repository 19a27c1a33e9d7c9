"""Zoho's API limits as the server applies them: per day, per rolling window, in flight.

Every arrival counts, rejected ones included, as Zoho counts them.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .config import SimConfig

MESSAGES = {
    44: (
        "For security reasons your organization has been blocked as it have exceeded the "
        "maximum number of requests per minute allowed. Please try again after some time."
    ),
    45: "The API call for this organization has exceeded the maximum call rate limit of {limit}.",
    1070: (
        "You have reached the maximum number of in process requests allowed. "
        "Please try again after some time."
    ),
}


@dataclass(frozen=True)
class Rejection:
    """A 429: Zoho's code, its message, and seconds until that limit lets requests in."""

    code: int
    message: str
    reset: float


def rejection(code: int, config: SimConfig, reset: float = 1.0) -> Rejection:
    """The 429 Zoho sends for this limit code (44, 45 or 1070)."""
    if code not in MESSAGES:
        raise ValueError(f"429 code must be one of {sorted(MESSAGES)}, not {code!r}")
    message = MESSAGES[code].format(limit=config.daily_limit)
    return Rejection(code, message, reset)


class Limiter:
    """Counts API arrivals and requests in flight, and says when to answer 429."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._start = clock()
        self._arrivals: deque[float] = deque()
        self._day = 0
        self._day_count = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def arrive(self, config: SimConfig) -> Rejection | None:
        """Count one API arrival; the limit it breaks, checked daily, window, concurrency."""
        now = self._clock()
        day = int((now - self._start) // config.day_seconds)
        if day != self._day:
            self._day, self._day_count = day, 0
        self._day_count += 1
        self._prune(now, config)
        self._arrivals.append(now)
        if config.daily_limit is not None and self._day_count > config.daily_limit:
            next_day = self._start + (day + 1) * config.day_seconds
            return rejection(45, config, next_day - now)
        if config.per_minute is not None and len(self._arrivals) > config.per_minute:
            # Rejected arrivals stay in the window, so the wait is until enough leave it.
            oldest_needed = self._arrivals[len(self._arrivals) - config.per_minute]
            return rejection(44, config, oldest_needed + config.window_seconds - now)
        if config.max_concurrent is not None and self.in_flight >= config.max_concurrent:
            return rejection(1070, config)
        return None

    def _prune(self, now: float, config: SimConfig) -> None:
        cutoff = now - config.window_seconds
        while self._arrivals and self._arrivals[0] <= cutoff:
            self._arrivals.popleft()

    def headers(self, config: SimConfig, reset: float | None = None) -> dict[str, str]:
        """X-Rate-Limit-* describing the per-minute window (reset: override, for a 429)."""
        if config.per_minute is None:
            if reset is None:
                return {}
            return {"X-Rate-Limit-Reset": str(max(0, math.ceil(reset)))}
        now = self._clock()
        self._prune(now, config)
        count = len(self._arrivals)
        if reset is None:
            reset = self._arrivals[0] + config.window_seconds - now if self._arrivals else 0.0
        return {
            "X-Rate-Limit-Limit": str(config.per_minute),
            "X-Rate-Limit-Remaining": str(max(0, config.per_minute - count)),
            "X-Rate-Limit-Reset": str(max(0, math.ceil(reset))),
        }

    def enter(self) -> None:
        """A request was admitted and is now in flight."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._wake()

    def leave(self) -> None:
        """An admitted request finished."""
        self.in_flight -= 1
        self._wake()

    def reset_peak(self) -> None:
        """Forget the peak of requests in flight."""
        self.max_in_flight = self.in_flight

    async def wait_in_flight(self, count: int) -> None:
        """Return once at least count requests are in flight."""
        if self.in_flight >= count:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((count, waiter))
        try:
            await waiter
        finally:
            self._waiters = [pair for pair in self._waiters if pair[1] is not waiter]

    def _wake(self) -> None:
        for count, waiter in self._waiters:
            if self.in_flight >= count and not waiter.done():
                waiter.set_result(None)
