"""The worst days: crashes, corrupt state, a full disk, dead tokens, slow servers."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    CREDS_ENV,
    DEVNULL,
    PIPE,
    SMALL,
    DaemonFactory,
    SimFactory,
    assert_folder_matches_state,
    assert_mirror,
    config_doc,
    daemon_config,
    run_once,
    start_once,
    write_toml,
)
from daemon_harness import get_json, scrape


@pytest.mark.timeout(120)
async def test_sigkill_at_random_points_loses_nothing(make_sim: SimFactory, tmp_path: Path) -> None:
    sim = await make_sim(**SMALL, latency=0.01)
    cfg = write_toml(tmp_path / "config.toml", config_doc(sim, download={"workers": 4}))
    images, state_file = tmp_path / "data" / "images" / "item", tmp_path / "data" / "state.json"
    rng = random.Random(20261204)
    kills = sorted(rng.sample(range(5, 110), 5))
    in_flight_at_kill = []
    for at in kills:
        proc = await start_once(cfg, stdout=DEVNULL, stderr=DEVNULL)
        await sim.wait_api_requests(at)
        in_flight_at_kill.append(sim.in_flight)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        # Whatever stands at a final name is complete: exactly the bytes served.
        for f in images.iterdir() if images.exists() else []:
            if not f.name.startswith(".zis-tmp-"):
                assert f.read_bytes() == sim.image_bytes(f.stem), f.name
    final = await start_once(cfg, stdout=PIPE, stderr=DEVNULL)
    out, _ = await final.communicate()
    assert final.returncode == 0
    assert json.loads(out)["status"] == "success"
    assert_mirror(sim, images)
    assert_folder_matches_state(images, state_file)
    served = [r.item_id for r in sim.records if r.endpoint == "image" and r.status == 200]
    extra = len(served) - 120
    # Each kill may cost the images the 4 workers held (served but not yet recorded): each
    # worker has at most two, one downloading and one with the image writer.
    assert 0 <= extra <= 2 * 4 * len(kills), (extra, in_flight_at_kill)


async def test_corrupt_state_is_set_aside_and_rebuilt(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    await run_once(cfg)
    before = {p.name: p.read_bytes() for p in cfg.storage.images_dir.iterdir()}
    garbage = cfg.storage.state_file.read_bytes()[:5000]  # truncated mid-document
    cfg.storage.state_file.write_bytes(garbage)
    report, code = await run_once(cfg)
    assert code == 0 and report["status"] == "success"
    kept = list(cfg.storage.state_file.parent.glob("state.json.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == garbage
    # Nothing lost: every image is still there with the same bytes, now recorded again.
    assert {p.name: p.read_bytes() for p in cfg.storage.images_dir.iterdir()} == before
    assert report["statistics"]["updated"] == 120  # verified by downloading, not trusted
    assert_folder_matches_state(cfg.storage.images_dir, cfg.storage.state_file)


async def test_after_a_rebuild_a_file_never_fetched_again_is_never_deleted(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    await run_once(cfg)
    logo = cfg.storage.images_dir / "logo.jpg"  # put there by hand: not an item of ours
    logo.write_bytes(b"\xff\xd8\xff\xe0 a logo")
    gone = sim.item_ids_with_images()[0]
    cfg.storage.state_file.write_bytes(b"{not json")
    sim.remove_item(gone)
    for _ in range(3):  # the third: both have missed two complete scans
        report, code = await run_once(cfg)
        assert (report["status"], code) == ("success", 0)
        assert report["statistics"]["removed"] == 0
    # Adopted after the loss, neither was fetched since: no proof they are ours.
    assert logo.read_bytes() == b"\xff\xd8\xff\xe0 a logo"
    assert (cfg.storage.images_dir / f"{gone}.jpg").exists()
    state = json.loads(cfg.storage.state_file.read_bytes())
    assert "logo" not in state["items"] and gone not in state["items"]
    # Items fetched again after the rebuild are ours again: a later removal deletes.
    assert not any(e.get("rebuilt") for e in state["items"].values())
    mine = sim.item_ids_with_images()[0]
    sim.remove_item(mine)
    for _ in range(2):
        report, _ = await run_once(cfg)
    assert report["statistics"]["removed"] == 1
    assert not (cfg.storage.images_dir / f"{mine}.jpg").exists()


async def test_journal_keeps_downloads_done_since_the_last_save(
    make_sim: SimFactory, make_config: Any
) -> None:
    from zoho_image_sync.state import State

    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    state = State(cfg.storage.state_file)
    state.journaling = True
    cfg.storage.state_file.parent.mkdir(parents=True)
    state.put("A1", status="downloaded", path="/x/A1.jpg", sha256="00", ext="jpg")
    state.save_sync()
    state.put("B2", status="downloaded", path="/x/B2.jpg", sha256="11", ext="jpg")
    state.put("A1", status="no_image", path=None)
    state.close()
    # A torn line at the end, as a crash mid-write leaves it.
    with state.journal_path.open("ab") as f:
        f.write(b'{"id": "C3", "entry": {"sta')
    again = State.read(cfg.storage.state_file)
    assert again.items["B2"]["status"] == "downloaded"
    assert again.items["A1"]["status"] == "no_image"
    assert "C3" not in again.items


def _unshare_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    import subprocess

    probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_available(), reason="needs unshare -Urm (user+mount namespace)")
async def test_full_disk_pauses_the_pass_and_a_later_run_finishes(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = await make_sim(items=100, with_images=60, min_image_bytes=30000, max_image_bytes=40000)
    cfg = write_toml(tmp_path / "config.toml", config_doc(sim, download={"workers": 2}))
    images = tmp_path / "data" / "images" / "item"
    images.mkdir(parents=True)
    out = tmp_path / "out"
    out.mkdir()
    # A 400 KB tmpfs as the images folder, in a private mount namespace: a real ENOSPC.
    script = (
        f"mount -t tmpfs -o size=400k tmpfs {images} && "
        f"{sys.executable} -m zoho_image_sync -c {cfg} once > {out}/report.json; "
        f"echo $? > {out}/rc; ls -a {images} > {out}/listing; "
        f"cd {images} && sha256sum -- * > {out}/sums 2>/dev/null; true"
    )
    env = {**os.environ, **CREDS_ENV}
    proc = await asyncio.create_subprocess_exec(
        "unshare",
        "-Urm",
        "sh",
        "-c",
        script,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert (out / "rc").read_text().strip() == "1", err.decode()[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and "refuses writes" in report["reason"]
    assert "No space left" in report["reason"]
    listing = (out / "listing").read_text().split()
    assert not [n for n in listing if n.startswith(".zis-tmp")]
    from zoho_image_sync.state import State

    state = State.read(tmp_path / "data" / "state.json")
    sums: dict[str, str] = {}
    for line in (out / "sums").read_text().splitlines():
        digest, name = line.split()
        sums[name] = digest
    downloaded = {k: v for k, v in state.items.items() if v["status"] == "downloaded"}
    assert 0 < len(downloaded) < 60
    assert {Path(v["path"]).name: v["sha256"] for v in downloaded.values()} == sums
    # Only the item that met the full disk is marked failed, not the rest of the catalogue.
    assert sum(v["status"] == "failed" for v in state.items.values()) <= 2
    # With room again, the next run finishes the job.
    again = await start_once(cfg, stdout=PIPE, stderr=DEVNULL)
    out2, _ = await again.communicate()
    assert again.returncode == 0 and json.loads(out2)["statistics"]["errors"] == 0
    assert_mirror(sim, images)


async def test_timeouts_are_retried_then_fail_the_item(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    slow, flaky = sim.item_ids_with_images()[:2]
    sim.add_fault("slow", slow, delay=5)
    sim.add_fault("slow", flaky, times=1, delay=5)
    cfg = make_config(sim, download={"timeout_seconds": 0.3, "max_attempts": 2})
    report, code = await run_once(cfg)
    assert code == 0
    assert report["errors"] == [
        {"zoho_item_id": slow, "reason": "retries_exhausted", "detail": "2 attempts, last: timeout"}
    ]
    assert (cfg.storage.images_dir / f"{flaky}.jpg").read_bytes() == sim.image_bytes(flaky)
    sim.release_slow()


async def test_attachment_not_found_as_400(make_sim: SimFactory, make_config: Any) -> None:
    sim = await make_sim(**SMALL, not_found_style="400")
    victim = sim.item_ids_with_images()[9]
    sim.add_fault("not_found", victim)
    report, _ = await run_once(make_config(sim))
    assert [(e["zoho_item_id"], e["reason"]) for e in report["errors"]] == [
        (victim, "image_not_found")
    ]
    assert "Attachment not found" in report["errors"][0]["detail"]


async def test_token_endpoint_down_fails_once_with_exit_1(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    sim.token_fault("error500")
    report, code = await run_once(make_config(sim))
    assert code == 1 and report["status"] == "failed"
    assert "unreachable" in report["reason"]
    # A bounded number of tries, not a loop.
    assert sim.stats()["requests"]["token"] == {"500": 3}


@pytest.mark.parametrize("fault", ["invalid_code", "throttle"])
async def test_daemon_stays_up_unready_when_the_token_is_refused(
    make_sim: SimFactory, daemons: DaemonFactory, tmp_path: Path, fault: str
) -> None:
    sim = await make_sim(**SMALL)
    sim.token_fault(fault)
    cfg, port = daemon_config(tmp_path, sim)
    d = await daemons(cfg, tmp_path)
    await d.wait_for("READY=1")
    await d.wait_for("STATUS=last pass failed")
    status, body = await get_json(port, "/readyz")
    assert status == 503 and body["ready"] is False
    m = await scrape(port)
    result = "error" if fault == "invalid_code" else "throttled"
    assert m[("zoho_image_sync_token_refreshes_total", (("result", result),))] == 1
    assert m[("zoho_image_sync_ready", ())] == 0
    status, _ = await get_json(port, "/healthz")
    assert status == 200
    # One call to the token endpoint, not a loop.
    assert sim.stats()["requests"]["token"] == {"200": 1}
    d.signal(signal.SIGTERM)
    assert await d.wait() == 0
    needle = b"zoho.refresh_token" if fault == "invalid_code" else b"throttled"
    assert needle in d.stderr


async def test_secrets_never_reach_state_metrics_or_endpoints(
    make_sim: SimFactory, daemons: DaemonFactory, tmp_path: Path
) -> None:
    sim = await make_sim(**SMALL)
    cfg, port = daemon_config(tmp_path, sim, log={"level": "debug"})
    d = await daemons(cfg, tmp_path)
    await d.wait_for("STATUS=last pass success")
    texts = []
    for path in ("/state", "/readyz", "/healthz"):
        texts.append(json.dumps((await get_json(port, path))[1]))
    texts.append(repr(await scrape(port)))
    d.signal(signal.SIGTERM)
    await d.wait()
    token = json.loads((tmp_path / "data" / "token.json").read_text())["access_token"]
    texts += [d.stderr.decode(), (tmp_path / "data" / "state.json").read_text()]
    for text in texts:
        for secret in [*CREDS_ENV.values(), token]:
            assert secret not in text
    assert oct((tmp_path / "data" / "token.json").stat().st_mode & 0o777) == "0o600"


async def test_daemon_sleeps_when_zoho_says_the_day_is_spent(
    make_sim: SimFactory, daemons: DaemonFactory, tmp_path: Path
) -> None:
    from zoho_image_sync.limits import next_utc_midnight

    sim = await make_sim(**SMALL, daily_limit=40)
    interval = 1
    cfg, port = daemon_config(tmp_path, sim, sync={"interval_seconds": interval})
    d = await daemons(cfg, tmp_path)
    await d.wait_for("STATUS=last pass interrupted")
    status, state = await get_json(port, "/state")
    assert state["last_report"]["reason"] == "daily_budget"
    assert state["budget_resumes_at"] == next_utc_midnight(state["last_report"]["finished_at"])
    assert state["daily_budget_remaining"] == 0
    m = await scrape(port)
    assert m[("zoho_image_sync_daily_budget_remaining", ())] == 0
    status, _ = await get_json(port, "/readyz")
    assert status == 200  # spending the budget is not a failure
    spent = sim.stats()["api_requests"]
    assert spent <= 40 + 10
    # interval_seconds is 1, yet no new pass starts before the reset, not even after a
    # reload (which re-schedules): for three intervals no pass ends and no request comes.
    d.signal(signal.SIGHUP)
    await d.wait_for("READY=1")
    watch = {
        asyncio.ensure_future(d.wait_for("STATUS=last pass")),
        asyncio.ensure_future(sim.wait_api_requests(spent + 1)),
    }
    done, pending = await asyncio.wait(watch, timeout=3 * interval)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    assert not done, [t.result() for t in done]
    status, state = await get_json(port, "/state")
    assert state["pass"] is None and sim.stats()["api_requests"] == spent
    d.signal(signal.SIGTERM)
    assert await d.wait() == 0


async def test_dns_failure_is_retried_then_fails_the_pass(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    # The token comes from the simulator; the API host does not resolve.
    cfg = make_config(
        sim, zoho={"api_url": "http://zoho-api.invalid/inventory/v1"}, download={"max_attempts": 2}
    )
    report, code = await run_once(cfg)
    assert code == 1 and report["status"] == "failed"
    assert report["reason"] == "items page 1: 2 attempts, last: dns_failed"
    assert sim.stats()["requests"] == {"token": {"200": 1}}


async def test_journal_lines_of_one_loop_turn_reach_the_file_by_the_next_turn(
    tmp_path: Path,
) -> None:
    from zoho_image_sync.state import State

    state = State(tmp_path / "state.json")
    state.journaling = True
    for n in range(5):
        state.put(f"I{n}", status="downloaded", path=f"/x/I{n}.jpg", sha256="00", ext="jpg")
    assert not state.journal_path.exists()  # buffered: one write for the whole turn
    await asyncio.sleep(0)
    lines = state.journal_path.read_bytes().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [f"I{n}" for n in range(5)]
    # A save (or close) writes what is buffered before it rotates the journal.
    state.put("I9", status="no_image")
    await state.save()
    assert State.read(tmp_path / "state.json").items["I9"]["status"] == "no_image"
    state.put("I8", status="no_image")
    state.close()
    assert json.loads(state.journal_path.read_bytes().splitlines()[-1])["id"] == "I8"


async def test_a_journal_write_failure_is_logged_and_the_save_still_has_everything(
    tmp_path: Path,
) -> None:
    from structlog.testing import capture_logs

    from zoho_image_sync.state import State

    state = State(tmp_path / "state.json")
    state.journaling = True
    state.journal_path.mkdir()  # the journal cannot be opened as a file
    with capture_logs() as logs:
        state.put("A1", status="downloaded", path="/x/A1.jpg", sha256="00", ext="jpg")
        await asyncio.sleep(0)
    assert [e["event"] for e in logs] == ["could not append to the state journal"]
    assert "Is a directory" in logs[0]["error"]
    state.journal_path.rmdir()
    await state.save()
    assert State.read(tmp_path / "state.json").items["A1"]["sha256"] == "00"


async def test_journal_warnings_name_no_item_and_a_torn_write_does_not_swallow_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import structlog
    from structlog.testing import capture_logs

    from zoho_image_sync.state import State

    state = State(tmp_path / "state.json")
    state.journaling = True
    real_write = os.write
    fail = [True]

    def torn_write(fd: int, data: Any) -> int:
        if fail[0]:
            fail[0] = False
            real_write(fd, bytes(data)[:10])  # part of the line reaches the file...
            raise OSError(28, "No space left on device")  # ...then the disk is full
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", torn_write)

    async def worker() -> None:
        # A worker's context carries its item id; the flush of the whole turn must not.
        structlog.contextvars.bind_contextvars(item_id="A")
        state.put("A", status="downloaded", path="/x/A.jpg", sha256="00", ext="jpg")

    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        await asyncio.create_task(worker())
        await asyncio.sleep(0)
    assert [e["event"] for e in logs] == ["could not append to the state journal"]
    assert "item_id" not in logs[0]
    state.put("B", status="no_image")
    await asyncio.sleep(0)
    state.close()
    again = State.read(tmp_path / "state.json")
    assert again.items["B"]["status"] == "no_image"  # the torn line did not eat it
    assert "A" not in again.items  # its line was torn: the next save writes it


async def test_two_failed_saves_in_a_row_lose_no_journaled_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from zoho_image_sync import state as state_module
    from zoho_image_sync.state import State

    state = State(tmp_path / "state.json")
    state.journaling = True
    state.put("A1", status="downloaded", path="/x/A1.jpg", sha256="aa", ext="jpg")
    await state.save()

    def disk_full(path: Path, data: bytes, mode: int = 0o644) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_module, "write_bytes_atomic", disk_full)
    state.put("B2", status="downloaded", path="/x/B2.jpg", sha256="bb", ext="jpg")
    with pytest.raises(OSError, match="No space left"):
        await state.save()  # the journal was rotated aside, the snapshot not written
    state.put("C3", status="downloaded", path="/x/C3.jpg", sha256="cc", ext="jpg")
    with pytest.raises(OSError, match="No space left"):
        await state.save()  # rotates again: both generations must survive
    state.close()  # then the process dies: only the files are left
    items = State.read(tmp_path / "state.json").items
    assert {k: v["sha256"] for k, v in items.items()} == {"A1": "aa", "B2": "bb", "C3": "cc"}
