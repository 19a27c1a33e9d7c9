"""Regressions from review and soak: each names the failure it guards against."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import json
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    CREDS_ENV,
    SMALL,
    SimFactory,
    StuckDisk,
    assert_mirror,
    config_doc,
    run_once,
    started,
    stop_with_writes_held,
    write_toml,
)
from zoho_image_sync import sync as sync_module
from zoho_image_sync.config import load as load_config
from zoho_image_sync.pager import zoho_pages
from zoho_image_sync.service import Daemon, Service
from zoho_image_sync.sync import SyncPass


async def test_malformed_urls_fail_their_item_not_the_pass(
    make_sim: SimFactory, make_config: Any, tmp_path: Path
) -> None:
    sim = await make_sim(**SMALL)
    a, b, c = sim.item_ids_with_images()[:3]
    url_map = tmp_path / "image_urls.json"
    url_map.write_text(
        json.dumps(
            {a: "http://[oops/x.jpg", b: "http://127.0.0.1:99999/x.jpg", c: "https:///nohost.jpg"}
        )
    )
    report, code = await run_once(make_config(sim, source={"url_map": str(url_map)}))
    assert code == 0 and report["status"] == "partial"
    assert {e["zoho_item_id"]: e["reason"] for e in report["errors"]} == {
        a: "bad_url",
        b: "bad_url",
        c: "bad_url",
    }
    assert report["statistics"]["new"] == 117


async def test_stop_while_the_pager_waits_is_an_interruption(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(items=500, with_images=10, min_image_bytes=2000, max_image_bytes=3000)
    sim.add_fault("slow", None, endpoint="items", page=2, delay=60)
    cfg = make_config(sim, sync={"shutdown_timeout_seconds": 1})
    service = Service(cfg)
    task = asyncio.create_task(service.once())
    await sim.wait_in_flight(1)
    await sim.wait_api_requests(1 + 4)  # page 1 and its 4 images are done; page 2 hangs
    t0 = time.monotonic()
    service.handle_term()
    report, code = await task
    assert time.monotonic() - t0 < 3
    assert code == 75 and report["status"] == "interrupted" and report["reason"] == "signal"
    sim.release_slow()


async def test_audit_beside_a_writer_touches_none_of_its_files(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    await run_once(cfg)
    images, state_dir = cfg.storage.images_dir, cfg.storage.state_file.parent
    temp = images / ".zis-tmp-123-abcd"  # a download in flight in another process
    temp.write_bytes(b"partial")
    journal = state_dir / "state.json.journal"
    journal.write_text('{"id": "X", "entry": null}\n')
    before = cfg.storage.state_file.read_bytes()
    audit = Service(cfg)
    await audit.startup(readonly=True)
    try:
        assert audit.client is not None
        pages = [p async for p, _ in zoho_pages(audit.client)]
        assert pages == [1, 2]
    finally:
        await audit.shutdown()
    assert temp.exists() and journal.exists()
    assert cfg.storage.state_file.read_bytes() == before


async def test_the_rolling_window_spans_processes(make_sim: SimFactory, make_config: Any) -> None:
    # audit, then once: between them never more than the limit in one window.
    sim = await make_sim(
        items=2000,
        with_images=20,
        min_image_bytes=2000,
        max_image_bytes=3000,
        per_minute=20,
        window_seconds=2.0,
    )
    cfg = make_config(sim, limits={"requests_per_minute": 20})
    audit = Service(cfg, window_seconds=2.0, window_margin=0.2)
    await audit.startup(readonly=True)
    try:
        assert audit.client is not None
        assert len([p async for p, _ in zoho_pages(audit.client)]) == 10
    finally:
        await audit.shutdown()
    report, code = await run_once(cfg, window_seconds=2.0, window_margin=0.2)
    assert code == 0 and report["status"] == "success"
    assert sim.max_in_window(2.0) <= 20
    assert all("429" not in codes for codes in sim.stats()["requests"].values())


async def test_retry_after_zero_does_not_hammer(make_sim: SimFactory, make_config: Any) -> None:
    sim = await make_sim(
        items=100,
        with_images=30,
        min_image_bytes=2000,
        max_image_bytes=3000,
        per_minute=15,
        window_seconds=1.0,
        retry_after=0,
    )
    cfg = make_config(sim, download={"workers": 4})
    report, _ = await run_once(cfg)
    assert report["status"] == "success"
    assert_mirror(sim, cfg.storage.images_dir)
    times: dict[str | None, list[float]] = defaultdict(list)
    for r in sim.records:
        if r.endpoint == "image":
            times[r.item_id].append(r.t)
    retried = [t for t in times.values() if len(t) > 1]
    assert retried, "the test needs some 429s to mean anything"
    for ts in retried:
        gaps = [b - a for a, b in itertools.pairwise(ts)]
        assert min(gaps) >= 0.95, gaps


async def test_token_throttle_back_off_survives_a_restart(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    sim.token_fault("throttle")
    cfg = make_config(sim)
    _, code = await run_once(cfg)
    assert code == 1
    sim.token_fault(None)  # Zoho would still block us; we must not even ask
    report, code = await run_once(cfg)
    assert code == 1 and "throttled" in report["reason"]
    assert sim.stats()["requests"]["token"] == {"200": 1}


async def test_refused_image_scope_stops_costing_requests(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL, image_scope=False)
    cfg = make_config(sim)
    report, _ = await run_once(cfg)
    assert report["statistics"]["errors"] == 120
    refused = sim.stats()["requests"]["image"]["401"]
    # The first refusal, its one retry with a fresh token, and what was already in flight.
    assert refused <= 2 + cfg.limits.max_concurrent_requests
    assert sim.stats()["tokens_minted"] <= 2


async def test_an_item_gone_from_zoho_is_removed_after_two_full_scans(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    await run_once(cfg)
    gone = sim.item_ids_with_images()[0]
    sim.remove_item(gone)
    first, _ = await run_once(cfg)
    assert first["statistics"]["removed"] == 0
    assert (cfg.storage.images_dir / f"{gone}.jpg").exists()
    second, _ = await run_once(cfg)
    assert second["statistics"]["removed"] == 1
    assert not (cfg.storage.images_dir / f"{gone}.jpg").exists()
    assert_mirror(sim, cfg.storage.images_dir)


async def test_an_images_folder_removed_between_passes_is_made_again_and_refilled(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    async with started(Service(cfg)) as service:
        await service.run_pass()
        shutil.rmtree(cfg.storage.images_dir)
        report = await service.run_pass()
        assert report["status"] == "success"
        st = report["statistics"]
        assert (st["updated"], st["errors"]) == (120, 0)
        assert_mirror(sim, cfg.storage.images_dir)


async def test_an_images_folder_removed_mid_pass_stops_the_pass_not_every_item(
    make_sim: SimFactory, make_config: Any, tmp_path: Path
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim, download={"workers": 2})
    async with started(Service(cfg)) as service:
        task = asyncio.create_task(service.run_pass())
        await asyncio.wait_for(sim.wait_api_requests(1 + 10), 30)  # page 1 and 10 images
        cfg.storage.images_dir.rename(tmp_path / "moved-away")  # gone, in one step
        report = await asyncio.wait_for(task, 30)
        assert report["status"] == "failed" and "refuses writes" in report["reason"]
        # Only the images in hand when it went failed, not the ~100 items after them: per
        # worker (2), at most 2 with the writer and 1 being downloaded.
        assert 1 <= report["statistics"]["errors"] <= 6
        assert service.state is not None
        assert service.state.counts()["failed"] <= 6
        again = await service.run_pass()
        assert again["status"] == "success"
        assert_mirror(sim, cfg.storage.images_dir)


@pytest.mark.parametrize(
    ("code", "status"),
    [(errno.EROFS, "failed"), (errno.EISDIR, "partial")],
    ids=["erofs", "eisdir"],
)
async def test_an_image_that_cannot_be_removed_fails_cleanly_and_is_removed_later(
    make_sim: SimFactory, make_config: Any, monkeypatch: pytest.MonkeyPatch, code: int, status: str
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    await run_once(cfg)
    gone = sim.item_ids_with_images()[0]
    sim.remove_image(gone)

    def refused(*_args: object) -> list[str]:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(sync_module, "remove_item_images", refused)
    report, _ = await run_once(cfg)
    # A read-only folder stops the pass (every write would fail); an odd error fails the
    # item. Neither is an "internal error", and the file and its entry stay for next time.
    assert report["status"] == status
    assert "internal error" not in str(report.get("reason"))
    assert [(e["zoho_item_id"], e["reason"]) for e in report["errors"]] == [(gone, "write_failed")]
    assert (cfg.storage.images_dir / f"{gone}.jpg").exists()
    monkeypatch.undo()
    again, code_again = await run_once(cfg)
    assert (again["status"], code_again) == ("success", 0)
    assert again["statistics"]["removed"] == 1
    assert not (cfg.storage.images_dir / f"{gone}.jpg").exists()


async def test_a_reload_reads_the_url_map_again_and_refuses_a_bad_one(
    make_sim: SimFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in CREDS_ENV.items():
        monkeypatch.setenv(name, value)
    sim = await make_sim(**SMALL)
    url_map = tmp_path / "image_urls.json"
    url_map.write_text("{}")
    path = write_toml(tmp_path / "config.toml", config_doc(sim, source={"url_map": str(url_map)}))
    async with started(Daemon(load_config(path))) as service:
        first = await service.run_pass()
        assert first["status"] == "success"
        a = sim.item_ids_with_images()[0]
        url_map.write_text(json.dumps({a: "ftp://example.invalid/a.jpg"}))
        assert await service.reload()
        second = await service.run_pass()
        assert [(e["zoho_item_id"], e["reason"]) for e in second["errors"]] == [(a, "bad_url")]
        url_map.write_text("{not json")
        assert not await service.reload()  # refused: the map read before stays
        assert service.url_map == {a: "ftp://example.invalid/a.jpg"}
        monkeypatch.delenv("ZOHO_REFRESH_TOKEN")
        url_map.write_text("{}")
        assert not await service.reload()  # credentials gone: refused, nothing changed
        assert service.url_map == {a: "ftp://example.invalid/a.jpg"}
        assert service.config.credentials.refresh_token is not None


async def test_the_token_goes_only_to_the_api_hosts_own_scheme(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim, zoho={"api_url": "https://127.0.0.1:18961/inventory/v1"})
    async with started(Service(cfg)) as service:  # no request is sent
        assert service.client is not None
        is_zoho = service.client.is_zoho_url
        assert is_zoho("https://127.0.0.1:18961/inventory/v1/items/1/image")
        assert is_zoho("https://127.0.0.1:18961/other/path")
        # Same host and port, plain http: no token (it would travel in clear text).
        assert not is_zoho("http://127.0.0.1:18961/inventory/v1/items/1/image")
        assert not is_zoho("https://127.0.0.1:18962/x")


async def test_state_entries_that_cannot_be_ours_are_set_right_not_trusted(
    make_sim: SimFactory, make_config: Any, tmp_path: Path
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    await run_once(cfg)
    a, b, c, d = sim.item_ids_with_images()[:4]
    victim = tmp_path / "victim.jpg"
    victim.write_bytes(b"not ours")
    doc = json.loads(cfg.storage.state_file.read_bytes())
    items = doc["items"]
    items[a]["path"] = 3  # a number: open(3) would read and close our own descriptor 3
    items[b]["bytes"] = "100"
    st = victim.stat()  # outside the images folder, with matching facts
    items[c].update(
        path=str(victim),
        bytes=st.st_size,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        sha256=hashlib.sha256(b"not ours").hexdigest(),
    )
    items["../../escape"] = {**items[d], "status": "downloaded"}
    cfg.storage.state_file.write_bytes(json.dumps(doc).encode())
    with cfg.storage.state_file.with_name("state.json.journal").open("ab") as j:
        j.write(b'{"id": [1], "entry": null}\n{"id": 5, "entry": {"status": "failed"}}\n')
    report, code = await asyncio.wait_for(run_once(cfg), 60)
    assert code == 0 and report["status"] == "success", report
    st_ = report["statistics"]
    # a, b, c: their file facts are not trusted, so they are fetched again (atomically).
    assert (st_["new"], st_["unchanged"], st_["errors"]) == (3, 117, 0)
    assert victim.read_bytes() == b"not ours"  # never read as ours, never touched
    state = json.loads(cfg.storage.state_file.read_bytes())
    assert "../../escape" not in state["items"] and "5" not in state["items"]
    for item_id in (a, b, c):
        assert state["items"][item_id]["path"] == str(cfg.storage.images_dir / f"{item_id}.jpg")
    assert_mirror(sim, cfg.storage.images_dir)


async def test_state_bookkeeping_of_the_wrong_shape_costs_no_crash(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    await run_once(cfg)
    doc = json.loads(cfg.storage.state_file.read_bytes())
    doc["meta"] = {
        "budget": "x",
        "passes_since_full": "abc",
        "last_full_pages": None,
        "last_complete_pass_started_at": "yesterday",
    }
    doc["last_pass"] = {"status": "success", "finished_at": 1.0}  # no statistics
    cfg.storage.state_file.write_bytes(json.dumps(doc).encode())
    report, code = await run_once(cfg)
    assert (report["status"], code) == ("success", 0)
    assert report["statistics"]["unchanged"] == 120
    state = json.loads(cfg.storage.state_file.read_bytes())
    assert state["meta"]["budget"]["spent"] == report["statistics"]["api_requests"] == 2
    assert state["last_pass"]["statistics"] == report["statistics"]
    # A complete full pass wrote the incremental bookkeeping afresh.
    assert (state["meta"]["passes_since_full"], state["meta"]["last_full_pages"]) == (0, 2)
    assert isinstance(state["meta"]["last_complete_pass_started_at"], float)


def _images_held(cfg: Any) -> set[str]:
    return {p.name for p in cfg.storage.images_dir.iterdir()}


async def test_passes_that_do_not_complete_never_delete(
    make_sim: SimFactory, make_config: Any
) -> None:
    # A pass that dies on page 2 has not seen the items of pages 2+: they are not gone.
    sim = await make_sim(**SMALL)
    cfg = make_config(sim, download={"max_attempts": 1})
    await run_once(cfg)
    held = _images_held(cfg)
    assert len(held) == len(sim.item_ids_with_images())
    sim.add_fault("status", None, endpoint="items", page=2, status=500)
    for _ in range(3):
        report, code = await run_once(cfg)
        assert (report["status"], code) == ("failed", 1)
        assert report["statistics"]["removed"] == 0
    assert _images_held(cfg) == held


async def test_an_empty_catalogue_deletes_nothing(make_sim: SimFactory, make_config: Any) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    await run_once(cfg)
    held = _images_held(cfg)
    for item in list(sim.items):
        sim.remove_item(item["item_id"])
    for _ in range(3):
        report, _ = await run_once(cfg)
        assert report["statistics"]["removed"] == 0
    assert _images_held(cfg) == held


async def test_an_item_that_comes_back_needs_two_new_misses(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    await run_once(cfg)
    flaky = sim.item_ids_with_images()[0]
    sim.remove_item(flaky)
    await run_once(cfg)  # one miss
    sim.add_item(flaky)
    await run_once(cfg)  # listed again: the miss is forgotten
    sim.remove_item(flaky)
    report, _ = await run_once(cfg)  # one miss again, not two
    assert report["statistics"]["removed"] == 0
    assert any(p.stem == flaky for p in cfg.storage.images_dir.iterdir())
    report, _ = await run_once(cfg)  # the second miss in a row: gone for sure
    assert report["statistics"]["removed"] == 1
    assert not any(p.stem == flaky for p in cfg.storage.images_dir.iterdir())


async def test_a_stuck_disk_does_not_hold_a_stop_past_its_deadline(
    make_sim: SimFactory, make_config: Any, stuck_disk: StuckDisk
) -> None:
    # The writer thread hangs on its first image; a stop must still end the pass within the
    # drain deadline (the late writes finish in the background).
    sim = await make_sim(**SMALL)
    cfg = make_config(sim, download={"workers": 2}, sync={"shutdown_timeout_seconds": 0.5})
    service = Service(cfg)
    task = asyncio.create_task(service.once())
    try:
        assert await asyncio.to_thread(stuck_disk.entered.wait, 10)
        await stop_with_writes_held(service, task, sim)
    finally:
        stuck_disk.release.set()


async def test_a_pass_that_raises_still_saves_the_budget_and_window(
    make_sim: SimFactory, make_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug (or an unexpected OSError) past the last item must not lose the day's count:
    # a restart would otherwise spend the daily budget twice.
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    _, code = await run_once(cfg)
    assert code == 0
    first = sim.stats()["api_requests"]

    def broken(self: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(SyncPass, "_forget_unlisted", broken)
    report, code = await run_once(cfg)
    assert code == 1 and report["status"] == "failed"
    total = sim.stats()["api_requests"]
    assert total > first  # the second pass paged the catalogue
    meta = json.loads(cfg.storage.state_file.read_bytes())["meta"]
    assert meta["budget"]["spent"] == total
    window = json.loads((cfg.storage.state_file.parent / "ratewindow.json").read_bytes())
    assert len(window) == total


def test_catalogue_items_read_as_before_for_odd_ids_and_nulls() -> None:
    from zoho_image_sync.pager import CatalogueItem

    class Sub(str):
        pass

    item = CatalogueItem.from_zoho
    assert item({"item_id": Sub("123")}).item_id == "123"
    assert item({"item_id": 42, "name": 7}).item_id == "42"
    assert item({"item_id": True}).item_id == ""  # a bool is not an id
    # The ERP export's zoho_item_id wins over an item_id of the ERP's own; either one
    # missing, null or empty leaves the other.
    assert item({"item_id": "ERP-7", "zoho_item_id": "9"}).item_id == "9"
    assert item({"item_id": None, "zoho_item_id": "9"}).item_id == "9"
    assert item({"item_id": "5", "zoho_item_id": None}).item_id == "5"
    assert item({"item_id": "5", "zoho_item_id": ""}).item_id == "5"
    assert item({"zoho_item_id": "9"}).item_id == "9"
    assert item({"zoho_item_id": None}).item_id == ""
    got = item({"item_id": "1", "name": None, "name_en": "N", "sku": None, "code": "C"})
    assert (got.name, got.sku) == ("", "")
    got = item({"item_id": "1", "name_en": "N", "code": "C", "image_name": 5})
    assert (got.name, got.sku, got.image_name) == ("N", "C", "5")
