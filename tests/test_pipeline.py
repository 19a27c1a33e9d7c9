"""The core pipeline against the simulator over real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from conftest import SMALL, SimFactory, StuckDisk, assert_mirror, run_once
from zoho_image_sync import download, storage
from zoho_image_sync.service import Service
from zoho_image_sync.simulator import Simulator
from zoho_image_sync.storage import sniff_image


async def test_full_pass_mirrors_the_catalogue(make_sim: SimFactory, make_config: Any) -> None:
    sim: Simulator = await make_sim()
    cfg = make_config(sim)
    report, code = await run_once(cfg)
    assert code == 0
    st = report["statistics"]
    assert report["status"] == "success"
    assert st["total"] == 2205
    assert st["new"] == st["images_downloaded"] == 1605
    assert st["no_image"] == 600
    assert st["errors"] == 0 and report["errors"] == []
    # 12 pages + 1605 images: the theoretical minimum, and what the simulator saw.
    assert st["api_requests"] == 12 + 1605 == sim.stats()["api_requests"]
    assert sim.stats()["tokens_minted"] == 1
    served = sum(len(sim.image_bytes(i) or b"") for i in sim.item_ids_with_images())
    assert st["bytes_downloaded"] == served
    assert_mirror(sim, cfg.storage.images_dir)
    types = {p.suffix for p in cfg.storage.images_dir.iterdir()}
    assert types == {".jpg", ".png"}
    state = json.loads(cfg.storage.state_file.read_bytes())
    assert stat.S_IMODE(cfg.storage.state_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(cfg.token_file.stat().st_mode) == 0o600
    statuses = [e["status"] for e in state["items"].values()]
    assert statuses.count("downloaded") == 1605 and statuses.count("no_image") == 600


async def test_second_pass_downloads_nothing_and_mints_no_token(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    first, _ = await run_once(cfg)
    assert first["statistics"]["new"] == 120
    sim.reset_log()
    second, code = await run_once(cfg)
    assert code == 0
    st = second["statistics"]
    assert st["unchanged"] == 120 and st["images_downloaded"] == 0 and st["new"] == 0
    assert st["api_requests"] == 2  # pages only
    assert sim.stats()["tokens_minted"] == 0
    assert sim.stats()["requests"].get("image") is None


async def test_changed_and_removed_images_are_mirrored(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    await run_once(cfg)
    ids = sim.item_ids_with_images()
    changed, retyped, removed = ids[0], ids[1], ids[2]
    old = (cfg.storage.images_dir / f"{changed}.jpg").read_bytes()
    sim.set_image(changed, kind="jpg")
    sim.set_image(retyped, kind="png")
    sim.remove_image(removed)
    report, code = await run_once(cfg)
    st = report["statistics"]
    assert code == 0
    assert st["updated"] == 2 and st["removed"] == 1 and st["new"] == 0
    assert st["images_downloaded"] == 2
    assert st["unchanged"] == 117
    new = (cfg.storage.images_dir / f"{changed}.jpg").read_bytes()
    assert new != old and new == sim.image_bytes(changed)
    assert not (cfg.storage.images_dir / f"{retyped}.jpg").exists()
    assert (cfg.storage.images_dir / f"{retyped}.png").read_bytes() == sim.image_bytes(retyped)
    assert not (cfg.storage.images_dir / f"{removed}.jpg").exists()
    state = json.loads(cfg.storage.state_file.read_bytes())
    assert state["items"][removed]["status"] == "no_image"
    assert_mirror(sim, cfg.storage.images_dir)


async def test_locally_damaged_file_is_fetched_again(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    await run_once(cfg)
    a, b, c = sim.item_ids_with_images()[:3]
    (cfg.storage.images_dir / f"{a}.jpg").unlink()
    (cfg.storage.images_dir / f"{b}.jpg").write_bytes(b"\xff\xd8\xff garbage")
    # Rewritten in place with its size and mtime put back: only the ctime and then the
    # hash can tell.
    p = cfg.storage.images_dir / f"{c}.jpg"
    st = p.stat()
    p.write_bytes(b"\x00" * st.st_size)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (p.stat().st_size, p.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    before = len(sim.records)
    report, _ = await run_once(cfg)
    assert report["statistics"]["updated"] == 3
    assert report["statistics"]["unchanged"] == 120 - 3
    for item_id in (a, b, c):
        got = (cfg.storage.images_dir / f"{item_id}.jpg").read_bytes()
        assert got == sim.image_bytes(item_id)
    fetched = sorted(r.item_id or "" for r in sim.records[before:] if r.endpoint == "image")
    assert fetched == sorted([a, b, c])


@pytest.mark.parametrize("writer_process", [True, False], ids=["process", "thread"])
async def test_recorded_stat_is_the_files_own_so_a_re_sync_reads_no_file(
    make_sim: SimFactory,
    make_config: Any,
    monkeypatch: pytest.MonkeyPatch,
    writer_process: bool,
) -> None:
    monkeypatch.setattr(storage, "WRITER_PROCESS", writer_process)
    sim = await make_sim(**SMALL)
    big = sim.item_ids_with_images()[:3]
    for item_id in big:  # over SPILL_BYTES: streamed to a temporary file, then renamed
        sim.set_image(item_id, "jpg", storage.SPILL_BYTES + 500_000)
    cfg = make_config(sim)
    await run_once(cfg)
    state = json.loads(cfg.storage.state_file.read_bytes())
    downloaded = {k: e for k, e in state["items"].items() if e["status"] == "downloaded"}
    assert len(downloaded) == 120
    assert all(downloaded[i]["bytes"] > storage.SPILL_BYTES for i in big)
    for e in downloaded.values():
        st = os.stat(e["path"])
        # Taken after the rename (which sets the ctime): else every file would be hashed
        # again on the next pass.
        assert (e["bytes"], e["mtime_ns"], e["ctime_ns"]) == (
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )
    hashed: list[str] = []
    real = download.verified_stat

    def counting(prev: Any) -> Any:
        hashed.append(prev["path"])
        return real(prev)

    monkeypatch.setattr(download, "verified_stat", counting)
    report, _ = await run_once(cfg)
    assert report["statistics"]["unchanged"] == 120
    assert hashed == []  # no file was read again


async def test_a_touched_file_is_hashed_not_fetched_and_its_new_stat_kept(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    await run_once(cfg)
    a, b = sim.item_ids_with_images()[:2]
    pa = cfg.storage.images_dir / f"{a}.jpg"
    pa.chmod(0o640)  # a new ctime, the same bytes
    # A state written before ctimes were recorded: b's entry has none.
    doc = json.loads(cfg.storage.state_file.read_bytes())
    del doc["items"][b]["ctime_ns"]
    cfg.storage.state_file.write_bytes(json.dumps(doc).encode())
    sim.reset_log()
    report, code = await run_once(cfg)
    assert code == 0
    assert report["statistics"]["unchanged"] == 120 and report["statistics"]["updated"] == 0
    assert sim.stats()["requests"].get("image") is None
    state = json.loads(cfg.storage.state_file.read_bytes())
    for item_id in (a, b):
        path = cfg.storage.images_dir / f"{item_id}.jpg"
        assert state["items"][item_id]["ctime_ns"] == path.stat().st_ctime_ns
    assert pa.read_bytes() == sim.image_bytes(a)


async def test_resume_after_an_interrupted_pass(make_sim: SimFactory, make_config: Any) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim, limits={"daily_request_budget": 52})
    report, code = await run_once(cfg)
    assert code == 75
    assert report["status"] == "interrupted" and report["reason"] == "daily_budget"
    done_first = report["statistics"]["images_downloaded"]
    pages = sum(r.endpoint == "items" for r in sim.records)
    assert 0 < done_first == 52 - pages
    assert sim.stats()["api_requests"] == 52
    state = json.loads(cfg.storage.state_file.read_bytes())
    assert sum(e["status"] == "downloaded" for e in state["items"].values()) == done_first
    cfg2 = make_config(sim, limits={"daily_request_budget": 1000})
    report2, code2 = await run_once(cfg2)
    assert code2 == 0
    assert report2["statistics"]["new"] == 120 - done_first
    assert report2["statistics"]["unchanged"] == done_first
    # No image was fetched twice across the two runs.
    image_requests = [r.item_id for r in sim.records if r.endpoint == "image"]
    assert len(image_requests) == len(set(image_requests)) == 120
    assert_mirror(sim, cfg.storage.images_dir)


@pytest.mark.parametrize(
    ("kind", "params", "reason"),
    [
        ("json200", {}, "not_an_image"),
        ("html200", {}, "not_an_image"),
        ("empty", {}, "empty_body"),
        ("oversize", {"size": 2_000_000}, "too_large"),
        ("not_found", {}, "image_not_found"),
        ("truncate", {}, "retries_exhausted"),
        ("status", {"status": 500}, "retries_exhausted"),
        ("reset", {}, "retries_exhausted"),
    ],
)
async def test_bad_responses_fail_one_item_and_write_nothing(
    make_sim: SimFactory, make_config: Any, kind: str, params: dict[str, Any], reason: str
) -> None:
    sim = await make_sim(**SMALL)
    victim = sim.item_ids_with_images()[5]
    sim.add_fault(kind, victim, **params)
    cfg = make_config(sim, download={"max_image_bytes": 1_000_000, "max_attempts": 3})
    report, code = await run_once(cfg)
    assert code == 0
    assert report["status"] == "partial"
    assert report["errors"] == [
        {"zoho_item_id": victim, "reason": reason, "detail": report["errors"][0]["detail"]}
    ]
    assert report["statistics"]["errors"] == 1
    assert report["statistics"]["new"] == 119
    names = {p.name for p in cfg.storage.images_dir.iterdir()}
    assert not any(n.startswith(victim) for n in names)
    assert not any(n.startswith(".") for n in names)
    if reason == "retries_exhausted":
        assert sum(r.item_id == victim for r in sim.records) == 3
    state = json.loads(cfg.storage.state_file.read_bytes())
    assert state["items"][victim]["status"] == "failed"
    assert state["items"][victim]["reason"] == reason


@pytest.mark.parametrize("kind", ["truncate", "reset", "status"])
async def test_transient_faults_are_retried_to_success(
    make_sim: SimFactory, make_config: Any, kind: str
) -> None:
    sim = await make_sim(**SMALL)
    victim = sim.item_ids_with_images()[7]
    sim.add_fault(kind, victim, times=2, **({"status": 503} if kind == "status" else {}))
    cfg = make_config(sim, download={"max_attempts": 3})
    report, _ = await run_once(cfg)
    assert report["status"] == "success"
    assert sum(r.item_id == victim for r in sim.records) == 3
    assert_mirror(sim, cfg.storage.images_dir)


async def test_magic_number_decides_the_extension(make_sim: SimFactory, make_config: Any) -> None:
    sim = await make_sim(**SMALL)
    a, b, c = sim.item_ids_with_images()[:3]
    sim.set_image(a, kind="gif")
    sim.set_image(b, kind="webp")
    sim.add_fault("wrong_type", c)  # Content-Type says png, bytes are JPEG
    cfg = make_config(sim)
    report, _ = await run_once(cfg)
    assert report["status"] == "success"
    d = cfg.storage.images_dir
    assert sniff_image((d / f"{a}.gif").read_bytes()[:12]) == "gif"
    assert sniff_image((d / f"{b}.webp").read_bytes()[:12]) == "webp"
    assert (d / f"{c}.jpg").exists() and not (d / f"{c}.png").exists()


@pytest.mark.parametrize(
    "bad_id", ["../../escape", "a/b", "..", "x" * 200, "nul\x00byte", "", "sp ace", None, True]
)
async def test_hostile_item_ids_are_refused(
    make_sim: SimFactory, make_config: Any, tmp_path: Path, bad_id: object
) -> None:
    sim = await make_sim(**SMALL)
    victim = sim.item_ids_with_images()[3]
    sim.set_item_field(victim, "item_id", bad_id)
    cfg = make_config(sim)
    report, code = await run_once(cfg)
    assert code == 0 and report["status"] == "partial"
    assert [e["reason"] for e in report["errors"]] == ["bad_item_id"]
    assert report["statistics"]["total"] == 300
    assert report["statistics"]["new"] == 119
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and "images" not in p.parts]
    assert {p.name for p in outside} <= {
        "state.json",
        "state.json.lock",
        "token.json",
        "ratewindow.json",
    }
    assert all(p.parent == cfg.storage.images_dir for p in cfg.storage.images_dir.rglob("*"))


async def test_a_no_change_pass_rewrites_no_state_entry(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    await run_once(cfg)
    before = json.loads(cfg.storage.state_file.read_bytes())["items"]
    await run_once(cfg)
    after = json.loads(cfg.storage.state_file.read_bytes())["items"]
    assert after == before  # not even updated_at moved: nothing was rewritten


async def test_a_slow_disk_holds_the_workers_at_two_images_each(
    make_sim: SimFactory, make_config: Any, stuck_disk: StuckDisk
) -> None:
    # The writer thread is stuck on the first image: each of the 2 workers may hand over
    # two bodies, then waits. No more images are fetched into memory until the disk moves.
    sim: Simulator = await make_sim(**SMALL)
    cfg = make_config(sim, download={"workers": 2})
    service = Service(cfg)
    task = asyncio.ensure_future(service.once())
    try:
        await asyncio.wait_for(sim.wait_api_requests(1 + 4), 10)  # the first page + 4 images
        with pytest.raises(TimeoutError):  # a fifth image would come at once if unbounded
            await asyncio.wait_for(sim.wait_api_requests(1 + 5), 1.0)
        assert sum(r.endpoint == "image" for r in sim.records) == 4
        # The scrape-time gauges see it: 4 downloads not yet durable, a full queue.
        text = service.metrics.exposition().decode()
        assert "\nzoho_image_sync_downloads_in_flight 4.0\n" in text
        assert "\nzoho_image_sync_queue_depth 16.0\n" in text
    finally:
        stuck_disk.release.set()
    report, code = await task
    text = service.metrics.exposition().decode()
    assert "\nzoho_image_sync_downloads_in_flight 0.0\n" in text
    assert "\nzoho_image_sync_queue_depth 0.0\n" in text
    assert code == 0 and report["statistics"]["images_downloaded"] == 120
    assert_mirror(sim, cfg.storage.images_dir)
