"""A faithful Zoho Inventory (and Accounts) simulator, served by aiohttp on loopback.

Used by the test suite, the `simulate` and `demo` commands, and benchmarks.
"""

from .app import Simulator
from .config import (
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    DEMO_CREDS_ENV,
    DEMO_REFRESH_TOKEN,
    SimConfig,
)
from .records import RequestRecord
from .runner import run_simulator

__all__ = [
    "DEMO_CLIENT_ID",
    "DEMO_CLIENT_SECRET",
    "DEMO_CREDS_ENV",
    "DEMO_REFRESH_TOKEN",
    "RequestRecord",
    "SimConfig",
    "Simulator",
    "run_simulator",
]
