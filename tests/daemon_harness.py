"""Run the real daemon in a subprocess, with a NOTIFY_SOCKET the test reads."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from zoho_image_sync.simulator import DEMO_CREDS_ENV

# How long next_message/wait_for wait before failing with the daemon's stderr.
MESSAGE_TIMEOUT = 30.0


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A loopback port free now, for a child process to listen on.

    Not from the kernel's ephemeral range (what binding port 0 returns): every outgoing
    connection of the suite takes a port from that range, and one could take this port
    between our check and the child's bind. Below the range only another listener can.
    """
    low, high = _ephemeral_range()
    start, stop = (10000, low) if low > 11000 else (high + 1, 65536)
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(start, stop)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}..{stop - 1}")


class Daemon:
    """``zoho-image-sync run`` as a child process; notifications arrive on a test socket."""

    def __init__(
        self,
        config: Path,
        folder: Path,
        watchdog_usec: int | None = None,
        credentials_in_env: bool = True,
    ) -> None:
        self.config = config
        self.folder = folder
        self.watchdog_usec = watchdog_usec
        self.credentials_in_env = credentials_in_env  # else only what the config file holds
        self.proc: asyncio.subprocess.Process | None = None
        self.sock_path = folder / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []
        self.stderr = b""

    async def start(self) -> None:
        env = {**os.environ, "NOTIFY_SOCKET": str(self.sock_path)}
        for name in DEMO_CREDS_ENV:
            env.pop(name, None)
        env.pop("CREDENTIALS_DIRECTORY", None)
        if self.credentials_in_env:
            env.update(DEMO_CREDS_ENV)
        if self.watchdog_usec:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "zoho_image_sync",
            "-c",
            str(self.config),
            "run",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        self._stderr_task = asyncio.ensure_future(self._read_stderr())
        self._exited = asyncio.ensure_future(self.proc.wait())

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.stderr += line

    async def next_message(self) -> str:
        """The next notification datagram.

        Fails (AssertionError, with the child's stderr) if none comes within MESSAGE_TIMEOUT
        or the child exits first, instead of running into the test's own timeout.
        """
        return await self._next(time.monotonic() + MESSAGE_TIMEOUT)

    async def wait_for(self, needle: str) -> str:
        """Read notifications until one contains ``needle`` (within MESSAGE_TIMEOUT)."""
        deadline = time.monotonic() + MESSAGE_TIMEOUT
        while True:
            msg = await self._next(deadline, needle)
            if needle in msg:
                return msg

    async def _next(self, deadline: float, needle: str | None = None) -> str:
        assert self.proc is not None, "start() first"
        recv = asyncio.ensure_future(asyncio.get_running_loop().sock_recv(self.sock, 4096))
        try:
            await asyncio.wait(
                {recv, self._exited},
                timeout=max(deadline - time.monotonic(), 0),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            if not recv.done():
                recv.cancel()
        if recv.done() and not recv.cancelled():
            data = recv.result()
        elif self._exited.done():
            # Datagrams sent just before the exit are already queued: those come first.
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                raise AssertionError(
                    f"the daemon exited ({self._exited.result()}) while the test waited "
                    f"for {needle or 'a notification'!r}{await self._stderr_tail()}"
                ) from None
        else:
            raise AssertionError(
                f"no {needle or 'notification'!r} within {MESSAGE_TIMEOUT} s; got "
                f"{[m for _, m in self.messages]}{await self._stderr_tail()}"
            )
        text = data.decode()
        self.messages.append((time.monotonic(), text))
        return text

    async def _stderr_tail(self) -> str:
        """The end of the child's stderr, for a failure message (complete once it exited)."""
        if self._exited.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._stderr_task), 5)
        return "\n--- daemon stderr (end) ---\n" + self.stderr[-4000:].decode(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        await self._stderr_task
        return code

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
        with contextlib.suppress(Exception):
            await self._stderr_task
        self.sock.close()


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The daemon's /metrics as {(sample name, sorted labels): value}."""
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def get_json(port: int, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}") as r:
        return r.status, await r.json()
