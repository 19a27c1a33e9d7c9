"""``run``: wire signals to the daemon's intents and run it."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import structlog

from .config import load
from .logsetup import Redactor, configure
from .loop import run as run_loop
from .service import Daemon

log = structlog.get_logger(__name__)


def run_daemon(config_path: Path, redactor: Redactor) -> int:
    """Run the daemon until SIGTERM/SIGINT; a second SIGINT forces."""
    cfg = load(config_path)
    redactor.add(*cfg.credentials.secrets())
    configure(cfg.log.level, cfg.log.format, redactor)

    async def go() -> int:
        daemon = Daemon(cfg, redactor=redactor)
        loop = asyncio.get_running_loop()
        interrupts = {"n": 0}

        def on_int() -> None:
            interrupts["n"] += 1
            if interrupts["n"] > 1:
                log.warning("second interrupt: exiting now")
                os._exit(130)
            daemon.handle_term()

        # Handlers only record intent (uvicorn's handle_exit); the loops act on it.
        loop.add_signal_handler(signal.SIGTERM, daemon.handle_term)
        loop.add_signal_handler(signal.SIGINT, on_int)
        loop.add_signal_handler(signal.SIGHUP, daemon.handle_hup)
        return await daemon.serve()

    return run_loop(go())
