"""sd_notify over $NOTIFY_SOCKET: a few lines of socket code, no dependency."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    """Sends systemd notifications when ``NOTIFY_SOCKET`` is set; a no-op otherwise."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        self.address = addr or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.watchdog_seconds = int(usec) / 1e6 if usec.isdigit() and ours else None

    def send(self, *lines: str) -> None:
        """Send ``KEY=VALUE`` lines in one datagram; errors are ignored (best effort)."""
        if self.address is None:
            return
        msg = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.address)
                s.sendall(msg)
        except OSError:
            pass

    def ready(self, status: str = "") -> None:
        """READY=1."""
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        """RELOADING=1 with the monotonic timestamp systemd wants (Type=notify-reload)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """STOPPING=1."""
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        """WATCHDOG=1."""
        self.send("WATCHDOG=1")

    def status(self, text: str) -> None:
        """STATUS=..."""
        self.send(f"STATUS={text}")
