"""``run``: the long-running daemon (built out in the service issue)."""

from __future__ import annotations

from pathlib import Path

from .logsetup import Redactor


def run_daemon(config_path: Path, redactor: Redactor) -> int:
    """Run the daemon until SIGTERM."""
    raise NotImplementedError("run: not built yet")
