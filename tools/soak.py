"""Soak: the real daemon against a simulator that injects a random mix of faults.

Usage: ``python tools/soak.py [--seconds 600] [--seed 1]`` (``make soak``). For the given
time the daemon runs passes while the simulator answers a share of requests with 5xx,
resets, truncated or slow bodies, JSON/HTML/empty bodies, 429s (44 and 1070), expired
tokens; the catalogue changes under it (images replaced, removed, added) and the daemon
is SIGKILLed and restarted now and then. Then the faults stop, one clean pass runs, and
the folder is checked against the simulator: every image byte-identical, nothing extra,
no temporary, the state agreeing with the files. Prints a JSON summary; exits 1 on loss.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from zoho_image_sync.simulator import DEMO_CREDS_ENV, SimConfig, Simulator  # noqa: E402
from zoho_image_sync.state import State  # noqa: E402

FAULT_KINDS = ["status", "reset", "truncate", "slow", "json200", "html200", "empty", "429"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child:
    """The daemon subprocess, its notifications and its peak RSS."""

    def __init__(self, config: Path, folder: Path) -> None:
        self.config = config
        self.sock_path = folder / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock.setblocking(False)
        self.proc: asyncio.subprocess.Process | None = None
        self.peak_rss_kb = 0
        self.killed: list[int] = []  # pids SIGKILLed: their image writers must not outlive them
        self.passes: dict[str, int] = {}
        self.pass_done = asyncio.Event()
        self.last_status = ""
        self.log = (folder / "daemon.log").open("ab")

    async def start(self) -> None:
        env = {
            **os.environ,
            **DEMO_CREDS_ENV,
            "NOTIFY_SOCKET": str(self.sock_path),
            "PYTHONPATH": str(ROOT / "src"),
        }
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "zoho_image_sync",
            "-c",
            str(self.config),
            "run",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=self.log,
        )

    def sample_rss(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                self.peak_rss_kb = max(self.peak_rss_kb, int(line.split()[1]))

    async def notifications(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            msg = (await loop.sock_recv(self.sock, 4096)).decode()
            for line in msg.splitlines():
                if line.startswith("STATUS=last pass "):
                    status = line.split()[2].rstrip(":")
                    self.passes[status] = self.passes.get(status, 0) + 1
                    self.last_status = status
                    self.pass_done.set()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.sample_rss()
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
            self.killed.append(self.proc.pid)

    async def term(self) -> int:
        assert self.proc is not None
        self.sample_rss()
        self.proc.send_signal(signal.SIGTERM)
        return await self.proc.wait()


def orphan_writers(killed: list[int]) -> int:
    """Image writer processes still alive whose daemon was SIGKILLed (argv ends in its pid)."""
    orphans = 0
    parents = {str(pid).encode() for pid in killed}
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"durable.py") for a in argv) and argv[-2:-1]:
            orphans += argv[-2] in parents
    return orphans


def verify(sim: Simulator, images: Path, state_file: Path) -> dict[str, int]:
    """Compare the folder with the simulator's truth."""
    want = {i: sim.image_bytes(i) for i in sim.item_ids_with_images()}
    files = {p.name: p for p in images.iterdir()}
    temporaries = sum(1 for n in files if n.startswith("."))
    have = {Path(n).stem: p for n, p in files.items() if not n.startswith(".")}
    lost = sum(1 for i in want if i not in have)
    corrupt = sum(1 for i, data in want.items() if i in have and have[i].read_bytes() != data)
    extra = sum(1 for i in have if i not in want)
    state = State.read(state_file)
    mismatched = 0
    for item_id, p in have.items():
        entry = state.items.get(item_id) or {}
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if entry.get("status") != "downloaded" or entry.get("sha256") != digest:
            mismatched += 1
    return {
        "expected_images": len(want),
        "items_lost": lost,
        "corrupt_files": corrupt,
        "extra_files": extra,
        "temporaries": temporaries,
        "state_mismatches": mismatched,
    }


async def soak(seconds: float, seed: int, folder: Path) -> dict[str, Any]:
    rng = random.Random(seed)
    sim = Simulator(SimConfig(seed=seed, per_minute=3000, max_concurrent=10, latency=0.005))
    await sim.start("127.0.0.1", 0)
    sim.add_fault(
        "random", None, rate=0.05, kinds=FAULT_KINDS, seed=seed, status=503, delay=1.5, code=44
    )
    sim.add_fault(
        "random",
        None,
        endpoint="items",
        rate=0.05,
        kinds=["status", "reset", "slow", "429"],
        seed=seed + 1,
        status=502,
        delay=1.0,
        code=1070,
    )
    port = free_port()
    config = folder / "config.toml"
    config.write_text(
        f"""[zoho]
accounts_url = "{sim.accounts_url}"
api_url = "{sim.api_url}"
[limits]
requests_per_minute = 2900
daily_request_budget = 1000000000
[download]
workers = 8
timeout_seconds = 1
max_attempts = 4
[sync]
interval_seconds = 5
full_rescan_every = 3
shutdown_timeout_seconds = 5
[http]
listen = "127.0.0.1:{port}"
[log]
format = "json"
"""
    )
    child = Child(config, folder)
    listener = asyncio.create_task(child.notifications())
    await child.start()
    deadline = time.monotonic() + seconds
    mutations = {
        "set_image": 0,
        "remove_image": 0,
        "add_item": 0,
        "tokens_revoked": 0,
        "sigkills": 0,
    }
    next_kill = time.monotonic() + rng.uniform(30, 90)
    next_revoke = time.monotonic() + rng.uniform(20, 60)
    while time.monotonic() < deadline:
        child.pass_done.clear()
        with_images = sim.item_ids_with_images()
        for _ in range(rng.randint(1, 8)):
            op = rng.choice(["set_image", "set_image", "remove_image", "add_item"])
            if op == "set_image":
                sim.set_image(rng.choice(with_images), kind=rng.choice(["jpg", "png", "gif"]))
            elif op == "remove_image":
                sim.remove_image(rng.choice(with_images))
            else:
                sim.add_item(with_image=True)
            mutations[op] += 1
        # Revocations are rare in life; more than ~10 mints per 10 minutes gets the real
        # token endpoint throttled (the simulator does it too), so at most one per 2 min.
        if time.monotonic() >= next_revoke:
            sim.revoke_all_tokens()
            mutations["tokens_revoked"] += 1
            next_revoke = time.monotonic() + rng.uniform(120, 180)
        if time.monotonic() >= next_kill:
            await child.kill()
            mutations["sigkills"] += 1
            await child.start()
            next_kill = time.monotonic() + rng.uniform(60, 120)
        child.sample_rss()
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.1) + 30):
                await child.pass_done.wait()
        except TimeoutError:
            break
    injected = dict(sim.stats()["faults_injected"])
    sim.clear_faults()
    # One full, clean pass: passes are counted, so wait for a success after the cleanup.
    while True:
        child.pass_done.clear()
        async with asyncio.timeout(300):
            await child.pass_done.wait()
        if child.last_status == "success":
            break
    code = await child.term()
    listener.cancel()
    stats = sim.stats()
    result = verify(sim, folder / "data" / "images" / "item", folder / "data" / "state.json")
    await sim.stop()
    return {
        "seconds": seconds,
        "seed": seed,
        "passes": child.passes,
        "images_served": stats["images_served"],
        "api_requests": stats["api_requests"],
        "tokens_minted": stats["tokens_minted"],
        "faults_injected": injected,
        "catalogue_changes": mutations,
        "exit_code_on_sigterm": code,
        "orphan_writer_processes": orphan_writers(child.killed),
        "peak_rss_mb": round(child.peak_rss_kb / 1024, 1),
        **result,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    args = p.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="zis-soak-"))
    folder.mkdir(parents=True, exist_ok=True)
    summary = asyncio.run(soak(args.seconds, args.seed, folder))
    summary["folder"] = str(folder)
    print(json.dumps(summary, indent=2))
    bad = summary["items_lost"] + summary["corrupt_files"] + summary["extra_files"]
    bad += summary["temporaries"] + summary["state_mismatches"]
    bad += summary["orphan_writer_processes"]
    return 1 if bad or summary["exit_code_on_sigterm"] != 0 else 0


if __name__ == "__main__":
    raise SystemExit(main())
