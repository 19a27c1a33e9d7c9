"""Factory fixtures: a real simulator on loopback, configs pointing at it, a pass runner."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from zoho_image_sync.config import Config
from zoho_image_sync.service import Service
from zoho_image_sync.simulator import (
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    DEMO_REFRESH_TOKEN,
    SimConfig,
    Simulator,
)

CREDS_ENV = {
    "ZOHO_CLIENT_ID": DEMO_CLIENT_ID,
    "ZOHO_CLIENT_SECRET": DEMO_CLIENT_SECRET,
    "ZOHO_REFRESH_TOKEN": DEMO_REFRESH_TOKEN,
}

SimFactory = Callable[..., Any]
EXE = [sys.executable, "-m", "zoho_image_sync"]
PIPE = asyncio.subprocess.PIPE
DEVNULL = asyncio.subprocess.DEVNULL


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


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """Build a validated Config for a simulator, rooted in the test's tmp folder."""

    def factory(sim: Simulator, env: dict[str, str] | None = None, **sections: Any) -> Config:
        doc = config_doc(sim, **sections)
        return Config.from_mapping(doc, tmp_path, env=CREDS_ENV if env is None else env)

    return factory


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
