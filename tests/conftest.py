"""Factory fixtures: a real simulator on loopback, configs pointing at it, a pass runner."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

import pytest
from aiohttp import web

from daemon_harness import Daemon, free_port
from zoho_image_sync import durable, storage
from zoho_image_sync.config import Config
from zoho_image_sync.service import Service
from zoho_image_sync.simulator import DEMO_CREDS_ENV, SimConfig, Simulator
from zoho_image_sync.state import State

CREDS_ENV: Final = DEMO_CREDS_ENV
# A small catalogue: 300 items, 120 with an image, most tests need no more.
SMALL: Final = {"items": 300, "with_images": 120, "min_image_bytes": 2000, "max_image_bytes": 20000}

ServiceT = TypeVar("ServiceT", bound=Service)
SimFactory = Callable[..., Any]
DaemonFactory = Callable[..., Awaitable[Daemon]]
HttpServer = Callable[[Iterable[web.AbstractRouteDef]], Awaitable[str]]
EXE = [sys.executable, "-m", "zoho_image_sync"]
PIPE = asyncio.subprocess.PIPE
DEVNULL = asyncio.subprocess.DEVNULL


def cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """The real command line, run to completion (blocking: use a thread beside a simulator)."""
    return subprocess.run(
        [*EXE, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


async def start_once(
    config: Path, stdout: int = PIPE, stderr: int = PIPE
) -> asyncio.subprocess.Process:
    """The real `once` as a child process, with the simulator's credentials."""
    return await asyncio.create_subprocess_exec(
        *EXE,
        "-c",
        str(config),
        "once",
        env={**os.environ, **CREDS_ENV},
        stdout=stdout,
        stderr=stderr,
    )


@pytest.fixture
async def make_sim() -> AsyncIterator[SimFactory]:
    """Start simulators on ephemeral ports; all are stopped at teardown."""
    started: list[Simulator] = []

    async def factory(**cfg: Any) -> Simulator:
        # Tests that are not about the per-minute limit do not wait for it.
        cfg.setdefault("per_minute", None)
        sim = Simulator(SimConfig(**cfg))
        await sim.start("127.0.0.1", 0)
        started.append(sim)
        return sim

    yield factory
    for sim in started:
        await sim.stop()


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in extra.items():
        if isinstance(v, dict):
            out.setdefault(k, {}).update(v)
        else:
            out[k] = v
    return out


def config_doc(sim: Simulator, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config document pointing at ``sim``, fast limits, data under the test folder."""
    base: dict[str, Any] = {
        "zoho": {"accounts_url": sim.accounts_url, "api_url": sim.api_url},
        "limits": {
            "requests_per_minute": 100_000,
            "max_concurrent_requests": 10,
            "daily_request_budget": 1_000_000,
        },
        "download": {"workers": 8, "timeout_seconds": 5, "max_attempts": 3},
        "storage": {"images_dir": "data/images/item", "state_file": "data/state.json"},
    }
    return deep_merge(base, sections)


def daemon_config(tmp_path: Path, sim: Simulator, **sections: Any) -> tuple[Path, int]:
    """A config file for ``run`` against ``sim``, its HTTP server on a free port."""
    port = free_port()
    doc = config_doc(sim, http={"listen": f"127.0.0.1:{port}"}, **sections)
    return write_toml(tmp_path / "config.toml", doc), port


@pytest.fixture
async def daemons() -> AsyncIterator[DaemonFactory]:
    """Start daemons (``run`` in a child process); all are killed at teardown."""
    started: list[Daemon] = []

    async def factory(config: Path, folder: Path, **kw: Any) -> Daemon:
        d = Daemon(config, folder, **kw)
        started.append(d)
        await d.start()
        return d

    yield factory
    for d in started:
        await d.stop()


@pytest.fixture
async def http_server() -> AsyncIterator[HttpServer]:
    """Serve an aiohttp app with the given routes on 127.0.0.1; returns its base URL."""
    runners: list[web.AppRunner] = []

    async def start(routes: Iterable[web.AbstractRouteDef]) -> str:
        app = web.Application()
        app.add_routes(routes)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """Build a validated Config for a simulator, rooted in the test's tmp folder."""

    def factory(sim: Simulator, env: dict[str, str] | None = None, **sections: Any) -> Config:
        doc = config_doc(sim, **sections)
        return Config.from_mapping(doc, tmp_path, env=CREDS_ENV if env is None else env)

    return factory


@contextlib.asynccontextmanager
async def started(service: ServiceT, readonly: bool = False) -> AsyncIterator[ServiceT]:
    """``service`` started up (in this process) for the block, shut down after it."""
    await service.startup(readonly=readonly)
    try:
        yield service
    finally:
        await service.shutdown()


async def run_once(cfg: Config, **kw: Any) -> tuple[dict[str, Any], int]:
    """One in-process pass with a fresh Service (as a new process would)."""
    service = Service(cfg, **kw)
    return await service.once()


def write_toml(path: Path, doc: dict[str, Any]) -> Path:
    """Write a config document as TOML (strings, numbers, booleans)."""
    lines = []
    for section, values in doc.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def assert_mirror(sim: Simulator, images_dir: Path) -> None:
    """Every file in images_dir is exactly what the simulator serves, and nothing is missing."""
    want = {i: sim.image_bytes(i) for i in sim.item_ids_with_images()}
    have = {p.stem: p for p in images_dir.iterdir()}
    assert not [n for n in have if n.startswith(".")], "temporaries left behind"
    assert set(have) == set(want)
    for item_id, data in want.items():
        assert have[item_id].read_bytes() == data, item_id


def assert_folder_matches_state(images_dir: Path, state_file: Path) -> dict[str, Any]:
    """The images folder and the saved state agree exactly; returns the state document.

    No temporaries; the files on disk are exactly the entries recorded as downloaded, each
    at its recorded path with its recorded sha256; the snapshot holds every change (the
    journal adds nothing to it).
    """
    doc: dict[str, Any] = json.loads(state_file.read_text())
    assert State.read(state_file).items == doc["items"], "changes only in the journal"
    files = {f.name: f for f in images_dir.iterdir()}
    assert not [n for n in files if n.startswith(".")], "temporaries left behind"
    downloaded = [e for e in doc["items"].values() if e["status"] == "downloaded"]
    recorded = {Path(e["path"]).name: e for e in downloaded}
    assert len(recorded) == len(downloaded), "two items recorded at one file"
    assert set(files) == set(recorded)
    for name, entry in recorded.items():
        assert Path(entry["path"]) == images_dir / name, entry["path"]
        assert hashlib.sha256(files[name].read_bytes()).hexdigest() == entry["sha256"], name
    return doc


class StuckDisk:
    """The image writer hangs in every write until ``release`` is set (``entered``: it
    reached the first one)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()


@pytest.fixture
def stuck_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[StuckDisk]:
    """A disk that does not move until the test says so; released at teardown."""
    disk = StuckDisk()
    real = durable.commit_bytes

    def held(*args: Any) -> Any:
        disk.entered.set()
        disk.release.wait(30)
        return real(*args)

    monkeypatch.setattr(durable, "commit_bytes", held)
    monkeypatch.setattr(storage, "WRITER_PROCESS", False)  # the patch reaches this process only
    yield disk
    disk.release.set()


async def stop_with_writes_held(service: Service, task: asyncio.Task[Any], sim: Simulator) -> None:
    """Both workers hold two images each with a writer that does not move: a stop must
    still end the pass within the drain deadline (0.5 s in the config), as interrupted,
    with no image counted."""
    await asyncio.wait_for(sim.wait_api_requests(1 + 4), 10)
    t0 = time.monotonic()
    service.handle_term()
    report, code = await asyncio.wait_for(task, 10)
    assert time.monotonic() - t0 < 3
    assert code == 75 and report["status"] == "interrupted"
    assert report["statistics"]["images_downloaded"] == 0
