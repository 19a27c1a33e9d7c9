"""Run the program's event loop: uvloop where available, asyncio's own otherwise.

uvloop measured +28% images/s and -12% CPU per image on the raw-throughput benchmark
(bench/RESULTS.md); behaviour is the same, so it is used whenever it is installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the fastest loop this platform has."""
    try:
        import uvloop
    except ImportError:  # e.g. Windows, or a platform without wheels
        return asyncio.run(coro)
    return uvloop.run(coro)
