"""The real command line in subprocesses: demo, once, status, export; no secret anywhere."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (
    CREDS_ENV,
    EXE,
    PIPE,
    SMALL,
    SimFactory,
    cli,
    config_doc,
    start_once,
    write_toml,
)
from zoho_image_sync.simulator import Simulator


@pytest.mark.timeout(150)  # the children's own timeouts (120 s) fire first
def test_demo_runs_with_no_credentials(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZOHO_")}
    proc = subprocess.run(
        [*EXE, "-c", str(tmp_path / "none.toml"), "demo", "--dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    st = report["statistics"]
    assert (st["total"], st["images_downloaded"], st["errors"]) == (2205, 1605, 0)
    assert len(list((tmp_path / "d" / "images" / "item").iterdir())) == 1605
    again = subprocess.run(
        [*EXE, "-c", str(tmp_path / "none.toml"), "demo", "--dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert json.loads(again.stdout)["statistics"]["images_downloaded"] == 0
    assert '"tokens_minted": 0' in again.stderr


@pytest.mark.timeout(150)  # the children's own timeouts (120 s) fire first
def test_demo_with_a_production_config_touches_neither_its_storage_nor_its_secrets(
    tmp_path: Path,
) -> None:
    prod = tmp_path / "prod"
    (prod / "images" / "item").mkdir(parents=True)
    (prod / "images" / "item" / "123.jpg").write_bytes(b"\xff\xd8\xff real image")
    (prod / "state.json").write_text('{"items": {}}')
    before = sorted((p.relative_to(prod), p.read_bytes()) for p in prod.rglob("*") if p.is_file())
    cfg = write_toml(
        tmp_path / "production.toml",
        {
            "storage": {
                "images_dir": str(prod / "images" / "item"),
                "state_file": str(prod / "state.json"),
            }
        },
    )  # accounts_url unset: the real Zoho
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "client_secret").write_text("real0systemd0secret")
    work = tmp_path / "work"
    work.mkdir()
    real = {
        "ZOHO_CLIENT_ID": "1000.REALCLIENT",
        "ZOHO_CLIENT_SECRET": "real0env0secret",
        "ZOHO_REFRESH_TOKEN": "1000.real0refresh",
        "CREDENTIALS_DIRECTORY": str(creds),
    }
    proc = cli("-c", str(cfg), "demo", env=real, cwd=work, timeout=120)
    # The simulator accepts only its own credentials: success means none of these were used.
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["statistics"]["images_downloaded"] == 1605
    assert len(list((work / "demo-data" / "images" / "item").iterdir())) == 1605
    after = sorted((p.relative_to(prod), p.read_bytes()) for p in prod.rglob("*") if p.is_file())
    assert after == before
    for secret in ("real0systemd0secret", "real0env0secret", "1000.real0refresh", "REALCLIENT"):
        assert secret not in proc.stderr + proc.stdout


async def test_once_status_export_and_no_secret_leaks(make_sim: SimFactory, tmp_path: Path) -> None:
    sim = await make_sim(**SMALL)
    victim = sim.item_ids_with_images()[0]
    sim.add_fault("json200", victim)
    doc = config_doc(sim, log={"level": "debug", "format": "json"})
    cfg = write_toml(tmp_path / "config.toml", doc)
    # The simulator lives in this event loop: the child runs in a thread, not blocking it.
    once = await asyncio.to_thread(cli, "-c", str(cfg), "once", env=CREDS_ENV)
    assert once.returncode == 0, once.stderr[-2000:]
    report = json.loads(once.stdout)
    assert report["status"] == "partial"
    assert report["errors"][0]["reason"] == "not_an_image"

    status = cli("-c", str(cfg), "status")
    assert status.returncode == 0
    counts = json.loads(status.stdout)["items"]
    assert counts == {"downloaded": 119, "no_image": 180, "failed": 1, "pending": 0}

    out = tmp_path / "erp" / "records.json"
    export = cli("-c", str(cfg), "export", "--out", str(out))
    assert export.returncode == 0
    assert json.loads(export.stdout) == {"written": 300, "path": str(out)}
    records = json.loads(out.read_text())
    # A bare file name is in the current folder (its temporary too, not in /).
    bare = cli("-c", str(cfg), "export", "--out", "bare.json", cwd=out.parent)
    assert bare.returncode == 0, bare.stderr[-2000:]
    assert json.loads(bare.stdout) == {"written": 300, "path": "bare.json"}
    assert json.loads((out.parent / "bare.json").read_text()) == records
    assert sorted(p.name for p in out.parent.iterdir()) == ["bare.json", "records.json"]
    # A pipe, a device or a link at --out is refused, not replaced by the rename.
    fifo, link = out.parent / "pipe", out.parent / "link.json"
    os.mkfifo(fifo)
    link.symlink_to(out)
    for target in (fifo, link):  # (not a real device: a regression would replace it)
        refused = cli("-c", str(cfg), "export", "--out", str(target))
        assert (refused.returncode, refused.stdout) == (1, ""), refused.stderr[-2000:]
        assert "not a regular file" in refused.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and link.readlink() == out
    audit = await asyncio.to_thread(
        cli, "-c", str(cfg), "audit", "--list", str(fifo), env=CREDS_ENV
    )
    assert audit.returncode == 1 and "not a regular file" in audit.stderr
    assert json.loads(audit.stdout)["total"] == 300  # the audit itself is still printed
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    by_id = {r["zoho_item_id"]: r for r in records}
    good = sim.item_ids_with_images()[1]
    assert by_id[good]["image_path"] == f"images/item/{good}.jpg"
    assert (tmp_path / "data" / by_id[good]["image_path"]).read_bytes() == sim.image_bytes(good)
    assert by_id[victim]["image_path"] is None and by_id[victim]["image_status"] == "failed"
    assert set(by_id[good]) == {
        "zoho_item_id",
        "name",
        "sku",
        "image_name",
        "image_document_id",
        "image_url",
        "image_path",
        "image_sha256",
        "image_bytes",
        "image_status",
    }

    access = json.loads((tmp_path / "data" / "token.json").read_text())["access_token"]
    secrets = [*CREDS_ENV.values(), access]
    texts = {
        "stderr": once.stderr + status.stderr + export.stderr,
        "stdout": once.stdout + status.stdout + export.stdout,
        "state": (tmp_path / "data" / "state.json").read_text(),
        "export": out.read_text(),
    }
    assert '"level": "debug"' in texts["stderr"]  # the debug log really was on
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"a secret leaked into {where}"


def test_bad_config_exits_78_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("[download]\nworkers = 0\n")
    proc = cli("-c", str(cfg), "once", env=CREDS_ENV)
    assert proc.returncode == 78
    assert "download.workers" in proc.stderr
    # once's stdout is always a pass report, here a failed one naming the key.
    report = json.loads(proc.stdout)
    assert report["status"] == "failed"
    assert "download.workers" in report["reason"]


@pytest.mark.parametrize(
    ("layout", "key", "why"),
    [
        ("state_file_is_a_folder", "storage.state_file", "Is a directory"),
        ("state_folder_is_a_file", "storage.state_file", "a file is where a folder should be"),
        ("images_dir_is_a_file", "storage.images_dir", "a file is where a folder should be"),
    ],
)
def test_unusable_storage_paths_exit_78_naming_the_key(
    tmp_path: Path, layout: str, key: str, why: str
) -> None:
    data = tmp_path / "data"
    if layout == "state_folder_is_a_file":
        data.write_text("")
    else:
        (data / "images").mkdir(parents=True)
        if layout == "state_file_is_a_folder":
            (data / "state.json").mkdir()
        else:
            (data / "images" / "item").write_text("")
    # Nothing is sent: start-up stops before the first request.
    cfg = write_toml(tmp_path / "config.toml", {"zoho": {"accounts_url": "http://127.0.0.1:9"}})
    proc = cli("-c", str(cfg), "once", env=CREDS_ENV)
    assert proc.returncode == 78, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == "failed"
    assert report["reason"].startswith(f"{key}: cannot use ") and why in report["reason"]


def test_second_instance_on_the_same_state_refuses(tmp_path: Path) -> None:
    import fcntl

    (tmp_path / "data").mkdir()
    lock = tmp_path / "data" / "state.json.lock"
    with lock.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        cfg = write_toml(tmp_path / "config.toml", {"zoho": {"accounts_url": "http://127.0.0.1:9"}})
        proc = cli("-c", str(cfg), "once", env=CREDS_ENV)
    assert proc.returncode == 78
    assert "another zoho-image-sync" in proc.stderr + proc.stdout


async def test_sigterm_during_once_exits_75_interrupted(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = await make_sim(**SMALL)
    sim.add_fault("slow", None, delay=0.2)
    cfg = write_toml(tmp_path / "config.toml", config_doc(sim, download={"workers": 2}))
    proc = await start_once(cfg, stdout=PIPE, stderr=PIPE)
    await sim.wait_api_requests(10)
    proc.send_signal(signal.SIGTERM)
    out, _err = await proc.communicate()
    assert proc.returncode == 75
    report = json.loads(out)
    assert report["status"] == "interrupted" and report["reason"] == "signal"
    state = json.loads((tmp_path / "data" / "state.json").read_text())
    done = [e for e in state["items"].values() if e["status"] == "downloaded"]
    assert len(done) == report["statistics"]["images_downloaded"] > 0
    names = sorted(p.name for p in (tmp_path / "data" / "images" / "item").iterdir())
    assert names == sorted(Path(e["path"]).name for e in done)


async def _stopping_once(
    make_sim: SimFactory, tmp_path: Path, first: signal.Signals, shutdown_timeout: float
) -> tuple[asyncio.subprocess.Process, Simulator]:
    """``once`` with two downloads held by the simulator, sent ``first``: returns once the
    child has logged the stop (the drain has begun)."""
    sim = await make_sim(**SMALL)
    sim.add_fault("slow", None, delay=30)
    doc = config_doc(
        sim,
        download={"workers": 2, "timeout_seconds": 60},
        sync={"shutdown_timeout_seconds": shutdown_timeout},
    )
    cfg = write_toml(tmp_path / "config.toml", doc)
    proc = await start_once(cfg, stdout=PIPE, stderr=PIPE)
    await sim.wait_in_flight(2)
    proc.send_signal(first)
    assert proc.stderr is not None
    async with asyncio.timeout(10):
        while b"stop requested" not in (line := await proc.stderr.readline()):
            assert line, "child exited early"
    return proc, sim


async def test_second_sigint_forces_exit(make_sim: SimFactory, tmp_path: Path) -> None:
    proc, _ = await _stopping_once(make_sim, tmp_path, signal.SIGINT, shutdown_timeout=60)
    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(10):
        await proc.communicate()
    assert proc.returncode == 130
    leftovers = [p for p in (tmp_path / "data" / "images" / "item").iterdir()]
    # A forced exit may leave a temporary; the next start sweeps it (never a final name).
    assert all(p.name.startswith(".zis-tmp-") for p in leftovers)


@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux script (a pty)")
async def test_progress_is_shown_on_a_terminal(make_sim: SimFactory, tmp_path: Path) -> None:
    sim = await make_sim(**SMALL, latency=0.05)  # a pass of ~3 s: progress every 1 s
    cfg = write_toml(tmp_path / "config.toml", config_doc(sim, download={"workers": 2}))
    command = " ".join([*EXE, "-c", str(cfg), "once"])
    env = {**os.environ, **CREDS_ENV}
    # `script` gives the child a pseudo-terminal, as an operator's shell would.
    proc = await asyncio.to_thread(
        subprocess.run,
        ["script", "-qec", command, "/dev/null"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "images " in proc.stdout and "/s" in proc.stdout and "eta " in proc.stdout
    assert '"status": "success"' in proc.stdout


def test_status_before_any_pass(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("")
    proc = cli("-c", str(cfg), "status")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "items": {"downloaded": 0, "no_image": 0, "failed": 0, "pending": 0},
        "last_pass": None,
    }


async def test_sigterm_then_one_sigint_still_drains(make_sim: SimFactory, tmp_path: Path) -> None:
    # systemd's SIGTERM, then an operator's single Ctrl-C: a clean stop, not a forced exit.
    proc, sim = await _stopping_once(make_sim, tmp_path, signal.SIGTERM, shutdown_timeout=1)
    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(20):
        out, _ = await proc.communicate()
    sim.release_slow()
    assert proc.returncode == 75  # once, interrupted: drained and saved
    assert json.loads(out)["reason"] == "signal"
    assert not [p for p in (tmp_path / "data" / "images" / "item").iterdir()]


def test_garbage_collection_is_on_once_the_command_line_is_imported() -> None:
    # cli.py turns it off for its imports only (a faster start); a daemon without it
    # would grow with every cycle it leaves behind.
    code = "import gc, zoho_image_sync.cli; print(gc.isenabled(), gc.get_threshold()[0] > 0)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["True", "True"]


def test_start_up_objects_are_frozen_and_later_cycles_still_collected() -> None:
    code = (
        "import gc, weakref, zoho_image_sync.cli\n"
        "frozen = gc.get_freeze_count()\n"
        "class Node: pass\n"
        "a, b = Node(), Node()\n"
        "a.other, b.other = b, a\n"
        "gone = weakref.ref(a)\n"
        "del a, b\n"
        "gc.collect()\n"
        "print(frozen, gone() is None)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    frozen, collected = out.stdout.split()
    assert int(frozen) > 10_000  # the imports' objects (~38,000 here)
    assert collected == "True"
