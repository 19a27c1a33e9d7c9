"""The ERP's own workflows: items file, url_map, audit, export/merge, incremental, Books."""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from conftest import (
    CREDS_ENV,
    SMALL,
    HttpServer,
    SimFactory,
    cli,
    config_doc,
    run_once,
    started,
    write_toml,
)
from zoho_image_sync.service import Service
from zoho_image_sync.simulator import Simulator
from zoho_image_sync.sources import ItemsFileError, iter_json_array


def export_record(sim: Simulator, item: dict[str, Any]) -> dict[str, Any]:
    """An item in the ERP export's shape (all_zoho_inventory_items.json)."""
    has = bool(item["image_document_id"])
    return {
        "zoho_item_id": item["item_id"],
        "code": item["sku"],
        "name_en": item["name"],
        "name_ar": "اسم",
        "unit": "pcs",
        "image_name": item["image_name"],
        "image_type": item["image_type"],
        "image_document_id": item["image_document_id"],
        "image_url": f"{sim.api_url}/items/{item['item_id']}/image" if has else "",
    }


async def test_items_file_downloads_exactly_the_valid_records(
    make_sim: SimFactory, make_config: Any, tmp_path: Path
) -> None:
    sim = await make_sim()  # the full 2,205-item catalogue
    cdn = await make_sim(items=1)  # another host: no token, per-host limits
    records = [export_record(sim, it) for it in sim.items]
    # Some items take their picture from another host, named in image_url.
    ext_ids = [r["zoho_item_id"] for r in records if r["image_document_id"]][:5]
    for r in records:
        if r["zoho_item_id"] in ext_ids:
            path = cdn.set_external(
                f"{r['zoho_item_id']}.jpg", sim.image_bytes(r["zoho_item_id"]) or b""
            )
            r["image_url"] = cdn.base_url + path
    # Some have a document id but no URL: the Zoho endpoint is used.
    no_url = [r for r in records if r["image_document_id"]][10:15]
    for r in no_url:
        r["image_url"] = ""
    bad = [
        {"name_en": "no id at all", "image_url": "https://example.invalid/x.jpg"},
        {"zoho_item_id": "BAD-URL-1", "image_url": "ht!tp:/broken"},
        {"zoho_item_id": "BAD-URL-2", "image_url": "file:///etc/passwd"},
        {"zoho_item_id": "../../etc", "image_url": f"{sim.api_url}/items/1/image"},
        records[3],  # a duplicate id
        {"name_en": "no id either"},  # a second entry without an id is no duplicate
        42,  # not an object
    ]
    items_file = tmp_path / "all_zoho_inventory_items.json"
    items_file.write_text(json.dumps(records[:100] + bad + records[100:], ensure_ascii=False))
    cfg = make_config(sim, source={"kind": "file", "items_file": str(items_file)})
    report, code = await run_once(cfg)
    assert code == 0 and report["status"] == "partial"
    reasons = sorted(e["reason"] for e in report["errors"])
    assert reasons == ["bad_item_id"] * 4 + ["bad_url"] * 2
    # Each bad id names its place in the file (the first of them is entry 101).
    where = sorted(
        e["detail"].rsplit("catalogue entry ", 1)[1]
        for e in report["errors"]
        if e["reason"] == "bad_item_id"
    )
    assert where == ["101)", "104)", "106)", "107)"]
    st = report["statistics"]
    assert st["total"] == 2205 + 6  # the duplicate is not counted twice
    assert st["new"] == 1605 and st["no_image"] == 600
    files = {p.stem: p.read_bytes() for p in cfg.storage.images_dir.iterdir()}
    assert set(files) == set(sim.item_ids_with_images())
    for item_id, data in files.items():
        assert data == sim.image_bytes(item_id)
    # The other host was asked without a token, the Zoho host with one.
    assert cdn.stats()["requests"].get("external", {}).get("200") == 5
    assert sim.stats()["requests"]["image"]["200"] == 1600
    assert cdn.records and not any(r.authorized for r in cdn.records)
    assert all(r.authorized for r in sim.records if r.endpoint in ("image", "items"))
    assert not (tmp_path / "etc").exists()


async def test_url_map_overrides_zoho_and_a_changed_url_is_a_changed_image(
    make_sim: SimFactory, make_config: Any, tmp_path: Path
) -> None:
    sim = await make_sim(**SMALL)
    cdn = await make_sim(items=1, seed=7)
    with_image = sim.item_ids_with_images()[0]
    without = next(i["item_id"] for i in sim.items if not i["image_document_id"])
    gif = cdn.image_bytes(cdn.item_ids_with_images()[0]) or b""
    cdn.set_external("a.jpg", gif)
    cdn.set_external("b.jpg", gif)
    url_map = tmp_path / "image_urls.json"
    url_map.write_text(
        json.dumps({with_image: cdn.base_url + "/ext/a.jpg", without: cdn.base_url + "/ext/b.jpg"})
    )
    cfg = make_config(sim, source={"url_map": str(url_map)})
    report, _ = await run_once(cfg)
    assert report["status"] == "success"
    assert report["statistics"]["new"] == 121
    image_ids = {r.item_id for r in sim.records if r.endpoint == "image"}
    assert with_image not in image_ids  # the map wins: Zoho not asked for it
    assert (cfg.storage.images_dir / f"{with_image}.jpg").read_bytes() == gif
    assert (cfg.storage.images_dir / f"{without}.jpg").read_bytes() == gif
    # Same URLs: nothing to do. A new URL: fetched again.
    cdn.set_external("c.jpg", sim.image_bytes(with_image) or b"")
    url_map.write_text(
        json.dumps({with_image: cdn.base_url + "/ext/c.jpg", without: cdn.base_url + "/ext/b.jpg"})
    )
    report, _ = await run_once(cfg)
    assert report["statistics"]["updated"] == 1 and report["statistics"]["unchanged"] == 120
    assert (cfg.storage.images_dir / f"{with_image}.jpg").read_bytes() == sim.image_bytes(
        with_image
    )


@pytest.fixture
async def redirector(
    make_sim: SimFactory, http_server: HttpServer
) -> tuple[str, Simulator, Counter[str]]:
    """A host that redirects: to an image, to file:, in a loop; it counts hits per path."""
    cdn = await make_sim(items=1, seed=3)
    data = cdn.image_bytes(cdn.item_ids_with_images()[0]) or b""
    cdn.set_external("img.jpg", data)
    hits: Counter[str] = Counter()

    async def to_image(request: web.Request) -> web.Response:
        hits[request.path] += 1
        if "Authorization" in request.headers:  # never sent off Zoho: fails the hits check
            hits["authorized"] += 1
        raise web.HTTPFound(cdn.base_url + "/ext/img.jpg")

    async def to_file(request: web.Request) -> web.Response:
        hits[request.path] += 1
        if "Authorization" in request.headers:  # never sent off Zoho: fails the hits check
            hits["authorized"] += 1
        raise web.HTTPFound("file:///etc/passwd")

    async def loop(request: web.Request) -> web.Response:
        hits[request.path] += 1
        if "Authorization" in request.headers:  # never sent off Zoho: fails the hits check
            hits["authorized"] += 1
        raise web.HTTPFound(str(request.url))

    base = await http_server(
        [web.get("/ok", to_image), web.get("/file", to_file), web.get("/loop", loop)]
    )
    return base, cdn, hits


async def test_redirects_only_to_http_and_at_most_five(
    make_sim: SimFactory,
    make_config: Any,
    tmp_path: Path,
    redirector: tuple[str, Simulator, Counter[str]],
) -> None:
    base, cdn, hits = redirector
    sim = await make_sim(**SMALL)
    a, b, c = sim.item_ids_with_images()[:3]
    url_map = tmp_path / "image_urls.json"
    url_map.write_text(json.dumps({a: base + "/ok", b: base + "/file", c: base + "/loop"}))
    cfg = make_config(sim, source={"url_map": str(url_map)})
    report, _ = await run_once(cfg)
    errors = {e["zoho_item_id"]: e["reason"] for e in report["errors"]}
    assert errors == {b: "bad_url", c: "bad_url"}
    details = {e["zoho_item_id"]: e["detail"] for e in report["errors"]}
    assert "more than 5 redirects" in details[c]
    assert "only http and https" in details[b]
    # The loop's first request and five redirects followed, then it stops: no retries.
    assert hits == {"/ok": 1, "/file": 1, "/loop": 6}
    assert cdn.records and not any(r.authorized for r in cdn.records)  # the redirect target
    assert (cfg.storage.images_dir / f"{a}.jpg").read_bytes() == cdn.image_bytes(
        cdn.item_ids_with_images()[0]
    )
    assert not list(cfg.storage.images_dir.glob(f"{b}.*"))


async def test_audit_pages_only_and_matches_the_truth(make_sim: SimFactory, tmp_path: Path) -> None:
    sim = await make_sim()
    cfg = write_toml(tmp_path / "config.toml", config_doc(sim))
    listing = tmp_path / "missing.csv"
    proc = await asyncio.to_thread(
        cli, "-c", str(cfg), "audit", "--list", str(listing), env=CREDS_ENV
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["total"] == 2205 and doc["with_image"] == 1605 and doc["without_image"] == 600
    assert doc["by_type"] == {"jpg": 1583, "png": 22}
    assert sim.stats()["requests"].keys() == {"token", "items"}
    assert sim.stats()["requests"]["items"] == {"200": 12}
    rows = list(csv.DictReader(listing.read_text().splitlines()))
    truth = {i["item_id"] for i in sim.items if not i["image_document_id"]}
    assert {r["zoho_item_id"] for r in rows} == truth


async def test_export_merge_changes_only_the_image_fields(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = await make_sim(**SMALL)
    sim.add_fault("not_found", sim.item_ids_with_images()[2])
    cfg = write_toml(tmp_path / "config.toml", config_doc(sim))
    once = await asyncio.to_thread(cli, "-c", str(cfg), "once", env=CREDS_ENV)
    assert once.returncode == 0
    erp = []
    for n, item in enumerate(sim.items):
        erp.append(
            {
                "zoho_item_id": item["item_id"],
                "price": n * 1.5,
                "name_ar": "صنف",
                "tags": ["a", {"b": n}],
                "image_path": "images/item/stale.jpg",
            }
        )
    erp.insert(7, {"zoho_item_id": "NOT-IN-ZOHO", "image_path": "keep/me.jpg"})
    erp_file = tmp_path / "tsh_item_records.json"
    erp_file.write_text(json.dumps(erp, ensure_ascii=False))
    out = tmp_path / "merged.json"
    proc = await asyncio.to_thread(
        cli, "-c", str(cfg), "export", "--out", str(out), "--merge", str(erp_file)
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "written": 301,
        "path": str(out),
        "matched": 300,
        "unknown": 1,
    }
    merged = json.loads(out.read_text())
    assert [r["zoho_item_id"] for r in merged] == [r["zoho_item_id"] for r in erp]
    image_keys = {
        "image_name",
        "image_document_id",
        "image_url",
        "image_path",
        "image_sha256",
        "image_bytes",
        "image_status",
    }
    for before, after in zip(erp, merged, strict=True):
        assert {k: v for k, v in after.items() if k not in image_keys} == {
            k: v for k, v in before.items() if k not in image_keys
        }
    by_id = {r["zoho_item_id"]: r for r in merged}
    assert by_id["NOT-IN-ZOHO"] == erp[7]
    ok, none, failed = (
        sim.item_ids_with_images()[0],
        next(i["item_id"] for i in sim.items if not i["image_document_id"]),
        sim.item_ids_with_images()[2],
    )
    assert by_id[ok]["image_path"] == f"images/item/{ok}.jpg"
    assert by_id[none]["image_path"] is None and by_id[none]["image_status"] == "no_image"
    assert by_id[failed]["image_path"] is None and by_id[failed]["image_status"] == "failed"
    csv_out = tmp_path / "records.csv"
    proc = await asyncio.to_thread(
        cli, "-c", str(cfg), "export", "--out", str(csv_out), "--format", "csv"
    )
    assert proc.returncode == 0
    rows = list(csv.DictReader(csv_out.read_text().splitlines()))
    assert len(rows) == 300 and {r["zoho_item_id"] for r in rows} == {
        i["item_id"] for i in sim.items
    }


async def test_incremental_pass_asks_only_for_modified_items(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim()  # 12 pages when read in full
    cfg = make_config(sim, sync={"full_rescan_every": 3})
    async with started(Service(cfg)) as service:
        first = await service.run_pass(allow_incremental=True)
        assert "incremental" not in first
        ids = sim.item_ids_with_images()
        sim.set_image(ids[0])
        sim.remove_image(ids[1])
        sim.reset_log()
        second = await service.run_pass(allow_incremental=True)
        pages = [r for r in sim.records if r.endpoint == "items"]
        assert len(pages) == 1
        assert second["incremental"]["api_requests_saved"] == 11
        st = second["statistics"]
        assert (st["total"], st["updated"], st["removed"]) == (2, 1, 1)
        assert st["api_requests"] == 2  # one page, one image
        assert not list(cfg.storage.images_dir.glob(f"{ids[1]}.*"))
        assert (cfg.storage.images_dir / f"{ids[0]}.jpg").read_bytes() == sim.image_bytes(ids[0])
        third = await service.run_pass(allow_incremental=True)
        assert third["incremental"]["pages"] == 1
        sim.reset_log()
        fourth = await service.run_pass(allow_incremental=True)  # 1 full + 2 incremental
        assert "incremental" not in fourth
        assert sum(r.endpoint == "items" for r in sim.records) == 12


@pytest.mark.parametrize("damage", ["deleted", "rewritten", "chmod"])
async def test_incremental_pass_puts_right_the_file_of_an_unmodified_item(
    make_sim: SimFactory, make_config: Any, damage: str
) -> None:
    sim = await make_sim()
    cfg = make_config(sim, sync={"full_rescan_every": 24})
    async with started(Service(cfg)) as service:
        await service.run_pass(allow_incremental=True)  # the first is a full scan
        hit = sim.item_ids_with_images()[2]
        path = cfg.storage.images_dir / f"{hit}.jpg"
        st0 = path.stat()
        if damage == "deleted":
            path.unlink()
        elif damage == "rewritten":  # in place, size and mtime put back
            path.write_bytes(b"\0" * st0.st_size)
            os.utime(path, ns=(st0.st_atime_ns, st0.st_mtime_ns))
        else:
            path.chmod(0o640)  # a new ctime, the same bytes: hashed, not fetched
        sim.reset_log()
        report = await service.run_pass(allow_incremental=True)
        assert "incremental" in report
        assert path.read_bytes() == sim.image_bytes(hit)
        images = [r for r in sim.records if r.endpoint == "image"]
        st = report["statistics"]
        if damage == "chmod":
            assert images == []
            assert (st["updated"], st["unchanged"], st["errors"]) == (0, 1, 0)
        else:
            assert len(images) == 1 and hit in images[0].path
            assert (st["updated"], st["images_downloaded"], st["errors"]) == (1, 1, 0)
        assert service.state is not None
        entry = service.state.get(hit)
        assert entry is not None and entry["status"] == "downloaded"
        assert entry["ctime_ns"] == path.stat().st_ctime_ns


async def test_books_endpoint_serves_when_the_inventory_scope_is_missing(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL, image_scope=False)
    inventory = make_config(sim)
    report, code = await run_once(inventory)
    assert code == 0 and report["status"] == "partial"
    assert {e["reason"] for e in report["errors"]} == {"forbidden"}
    detail = report["errors"][0]["detail"]
    assert "ZohoInventory.items.READ" in detail and "image_endpoint = 'books'" in detail
    books = make_config(sim, zoho={"image_endpoint": "books"})
    report, code = await run_once(books)
    assert code == 0 and report["status"] == "success"
    assert report["statistics"]["new"] == 120
    assert sim.stats()["requests"]["books_image"]["200"] == 120


def test_streaming_parser_handles_chunk_boundaries_and_refuses_garbage(tmp_path: Path) -> None:
    docs = [
        {"zoho_item_id": str(i), "name_en": "x" * (i % 50), "n": [i, {"k": "]"}]}
        for i in range(500)
    ]
    p = tmp_path / "items.json"
    p.write_text(json.dumps(docs, indent=2))
    assert list(iter_json_array(p, read_bytes=7)) == docs
    for bad in ("{}", "[1, 2", "[1 2]", '[{"a": }]', ""):
        p.write_text(bad)
        with pytest.raises(ItemsFileError):
            list(iter_json_array(p, read_bytes=3))
    p.write_text("[]")
    assert list(iter_json_array(p)) == []
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(docs[:3]).encode())  # a BOM, as Windows tools write
    assert list(iter_json_array(p)) == docs[:3]
    # Too deep, or a number too long for Python: named as the file's fault, not a crash.
    for bad in ("[" + "[" * 100_000 + "]" * 100_000 + "]", "[" + "9" * 5000 + "]"):
        p.write_text(bad)
        with pytest.raises(ItemsFileError, match="element 0 cannot be read"):
            list(iter_json_array(p))


async def test_incremental_pass_retries_failed_items(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    victim = sim.item_ids_with_images()[4]
    sim.add_fault("status", victim, times=3, status=500)
    cfg = make_config(sim, download={"max_attempts": 3})
    async with started(Service(cfg)) as service:
        first = await service.run_pass(allow_incremental=True)
        assert [e["zoho_item_id"] for e in first["errors"]] == [victim]
        second = await service.run_pass(allow_incremental=True)
        assert second["incremental"]["pages"] == 1  # nothing modified in Zoho...
        assert second["statistics"]["new"] == 1  # ...but the failed item was tried again
        assert second["status"] == "success"


async def test_gzipped_bodies_are_unpacked_and_a_gzip_bomb_stops_at_the_cap(
    make_sim: SimFactory, make_config: Any, tmp_path: Path, http_server: HttpServer
) -> None:
    # Content-Length is the packed size here: the one-read path must not be taken, and the
    # unpacked bytes must be what is stored and what max_image_bytes caps.
    image = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 400  # ~100 KB, packs well
    bomb = b"\xff\xd8\xff\xe0" + b"\0" * (20 << 20)  # 20 MB unpacked, ~20 KB packed

    def gz(body: bytes) -> web.Response:
        packed = gzip.compress(body)
        return web.Response(
            body=packed,
            headers={"Content-Encoding": "gzip", "Content-Type": "image/jpeg"},
        )

    async def small(request: web.Request) -> web.Response:
        return gz(image)

    async def huge(request: web.Request) -> web.Response:
        return gz(bomb)

    base = await http_server([web.get("/small.jpg", small), web.get("/bomb.jpg", huge)])
    sim = await make_sim(**SMALL)
    a, b = sim.item_ids_with_images()[:2]
    url_map = tmp_path / "image_urls.json"
    url_map.write_text(json.dumps({a: base + "/small.jpg", b: base + "/bomb.jpg"}))
    cfg = make_config(sim, source={"url_map": str(url_map)}, download={"max_image_bytes": 5 << 20})
    report, _ = await run_once(cfg)
    assert {e["zoho_item_id"]: e["reason"] for e in report["errors"]} == {b: "too_large"}
    assert (cfg.storage.images_dir / f"{a}.jpg").read_bytes() == image
    assert not list(cfg.storage.images_dir.glob(f"{b}.*"))


async def test_cookies_ride_along_one_download_s_redirects_and_never_to_another_item(
    make_sim: SimFactory, make_config: Any, tmp_path: Path, http_server: HttpServer
) -> None:
    # A host that sets a cookie on its 302 and wants it on the target (a CDN's bot check),
    # and sets another on the image itself: the redirect chain of one download keeps its
    # cookies; every item starts clean (its first request carries none).
    sim = await make_sim(**SMALL)
    ids = sim.item_ids_with_images()[:4]
    first_hops: list[str | None] = []

    async def start(request: web.Request) -> web.Response:
        first_hops.append(request.headers.get("Cookie"))
        resp = web.HTTPFound(f"/final/{request.match_info['id']}")
        resp.set_cookie("ok", "1", path="/")
        raise resp

    async def final(request: web.Request) -> web.Response:
        if request.cookies.get("ok") != "1":
            raise web.HTTPFound(f"/img/{request.match_info['id']}")
        resp = web.Response(body=sim.image_bytes(request.match_info["id"]) or b"")
        resp.set_cookie("session", "abc123", path="/")
        return resp

    # A host name, not an IP: a shared default jar (what this guards against) would
    # ignore cookies from an IP host.
    routes = [web.get("/img/{id}", start), web.get("/final/{id}", final)]
    base = (await http_server(routes)).replace("127.0.0.1", "localhost")
    url_map = tmp_path / "image_urls.json"
    url_map.write_text(json.dumps({i: f"{base}/img/{i}" for i in ids}))
    cfg = make_config(sim, source={"url_map": str(url_map)}, download={"workers": 1})
    report, _ = await run_once(cfg)
    assert report["errors"] == []
    assert first_hops == [None] * 4
    for i in ids:
        assert (cfg.storage.images_dir / f"{i}.jpg").read_bytes() == sim.image_bytes(i)
