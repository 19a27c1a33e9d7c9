"""Serve a simulator until cancelled (the `simulate` command's engine)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .app import Simulator
from .config import SimConfig


async def run_simulator(
    config: SimConfig,
    host: str = "127.0.0.1",
    port: int = 8900,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until cancelled, then stop cleanly; ready(base_url) is called once serving."""
    simulator = Simulator(config)
    base_url = await simulator.start(host, port)
    try:
        if ready is not None:
            ready(base_url)
        # Signal handling is the caller's: it cancels this coroutine to stop.
        await asyncio.Event().wait()
    finally:
        await simulator.stop()
