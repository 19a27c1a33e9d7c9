"""Process measurement and small statistics helpers shared by the scenarios.

Every contender runs as its own child process under GNU time; ``run_measured`` reaps
it with ``os.wait4`` so its user/sys CPU time comes straight from the kernel, takes the
peak RSS from GNU time, and can sample the command's CPU time from ``/proc/PID/stat``
while it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import IO, Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    """Return once 127.0.0.1:port accepts connections."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            s.settimeout(0.2)
            try:
                s.connect(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}") from None
        time.sleep(0.02)


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process (or a zombie not reaped yet), in seconds."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (all its threads)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(x) for x in (task / "children").read_text().split()]
    return out


@dataclass
class Measured:
    """One child process run: wall time, CPU, peak RSS, exit code, CPU samples."""

    argv: list[str]
    wall: float
    user: float
    sys: float
    maxrss_kb: int
    returncode: int
    started: float
    samples: list[tuple[float, float]] = field(default_factory=list)

    @property
    def cpu(self) -> float:
        """User + system CPU seconds."""
        return self.user + self.sys

    @property
    def rss_mb(self) -> float:
        """Peak resident set size in MB (10^6 bytes, as the issue's targets)."""
        return self.maxrss_kb * 1024 / 1e6


GNU_TIME = Path("/usr/bin/time")


def run_measured(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdout_path: Path | None = None,
    stderr_path: Path | None = None,
    sample_every: float | None = None,
    timeout: float = 1800.0,
) -> Measured:
    """Run ``argv`` to completion and measure it (never through a shell).

    The command runs under GNU time (``/usr/bin/time -f %M``) for its peak RSS: a
    child's ``ru_maxrss`` starts at its parent's RSS at fork time (the kernel carries
    the pre-exec high-water mark over), so the harness's own size would leak into the
    figure; GNU time is a 2 MB parent. CPU comes from ``wait4`` on GNU time, which
    includes the command it waited for. ``sample_every`` samples the command's CPU.
    """
    with contextlib.ExitStack() as stack:
        out: IO[bytes] | int = subprocess.DEVNULL
        err: IO[bytes] | int = subprocess.DEVNULL
        if stdout_path is not None:
            out = stack.enter_context(stdout_path.open("wb"))
        if stderr_path is not None:
            err = stack.enter_context(stderr_path.open("wb"))
        rss_file = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "rss"
        full = [str(GNU_TIME), "-f", "%M", "-o", str(rss_file), *argv]
        t0 = time.monotonic()
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        def sampler() -> None:
            assert sample_every is not None
            target: int | None = None
            while not done.wait(sample_every):
                if target is None:
                    kids = child_pids(proc.pid)
                    if not kids:
                        continue
                    target = kids[0]
                cpu = proc_cpu_seconds(target)
                if cpu is None:
                    return
                samples.append((time.monotonic(), cpu))

        def killer() -> None:
            if not done.wait(timeout):
                for pid in child_pids(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)

        threads = [threading.Thread(target=killer, daemon=True)]
        if sample_every:
            threads.append(threading.Thread(target=sampler, daemon=True))
        for t in threads:
            t.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            t1 = time.monotonic()
            done.set()
            for t in threads:
                t.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        try:
            maxrss_kb = int(rss_file.read_text().split()[-1])
        except (OSError, ValueError, IndexError):
            maxrss_kb = 0
    return Measured(
        argv=list(argv),
        wall=t1 - t0,
        user=usage.ru_utime,
        sys=usage.ru_stime,
        maxrss_kb=maxrss_kb,
        returncode=proc.returncode,
        started=t0,
        samples=samples,
    )


def http_json(url: str, method: str = "GET", body: bytes | None = None) -> Any:
    """A small JSON request to a loopback server (the simulator's admin routes)."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname != "127.0.0.1":
        raise ValueError(f"the harness only talks to 127.0.0.1, not {parts.hostname}")
    conn = HTTPConnection("127.0.0.1", parts.port or 80, timeout=60)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return json.loads(data)


def median(values: Sequence[float]) -> float:
    """The median (0 for no values)."""
    return statistics.median(values) if values else 0.0


def spread(values: Sequence[float]) -> float:
    """Half the min-max range relative to the median, in percent."""
    m = median(values)
    if len(values) < 2 or m == 0:
        return 0.0
    return 50.0 * (max(values) - min(values)) / m


def fmt(values: Sequence[float], digits: int = 0) -> str:
    """``median ±spread%`` for a table cell."""
    m = median(values)
    s = spread(values)
    text = f"{m:,.{digits}f}"
    return f"{text} ±{s:.0f}%" if len(values) > 1 else text


def count_files(folder: Path) -> tuple[int, int]:
    """(files, bytes) directly in ``folder``, temporaries and control files excluded."""
    n = total = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if entry.is_file() and not entry.name.startswith(".") and "." in entry.name:
                if entry.name.endswith(".aria2"):
                    continue
                n += 1
                total += entry.stat().st_size
    return n, total
