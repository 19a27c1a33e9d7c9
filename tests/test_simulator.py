"""The Zoho simulator behaves like the real service, as ZOHO_API_FACTS.md describes it."""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from zoho_image_sync.simulator import (
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    DEMO_REFRESH_TOKEN,
    RequestRecord,
    SimConfig,
    Simulator,
    run_simulator,
)
from zoho_image_sync.simulator.images import KINDS, min_size, render, sniff

pytestmark = pytest.mark.timeout(10)

ORG = "748369814"
TOKEN_FORM = {
    "refresh_token": DEMO_REFRESH_TOKEN,
    "client_id": DEMO_CLIENT_ID,
    "client_secret": DEMO_CLIENT_SECRET,
    "grant_type": "refresh_token",
}
IMAGE_TYPES = {"jpg": "image/jpeg", "png": "image/png", "gif": "image/gif", "webp": "image/webp"}


class FakeClock:
    """A clock the test moves by hand, so windows and expiry need no sleeping."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Harness:
    """A simulator served on loopback plus a client that talks to it."""

    def __init__(self, sim: Simulator, client: Any) -> None:
        self.sim = sim
        self.client = client
        self._token: str | None = None

    async def mint(self, **overrides: str) -> tuple[int, dict[str, Any]]:
        response = await self.client.post("/oauth/v2/token", data={**TOKEN_FORM, **overrides})
        return response.status, await response.json(content_type=None)

    async def token(self) -> str:
        if self._token is None:
            self._token = self.sim.issue_token()
        return self._token

    async def get(
        self,
        path: str,
        *,
        token: str | None = None,
        org: str | None = ORG,
        params: dict[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        query = dict(params or {})
        if org is not None:
            query["organization_id"] = org
        auth = token if token is not None else await self.token()
        headers = {"Authorization": f"Zoho-oauthtoken {auth}"} if auth else {}
        response: aiohttp.ClientResponse = await self.client.get(
            path, params=query, headers=headers
        )
        return response

    async def get_json(self, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        response = await self.get(path, **kwargs)
        return response.status, await response.json(content_type=None)

    async def image(self, item_id: str, **kwargs: Any) -> aiohttp.ClientResponse:
        return await self.get(f"/inventory/v1/items/{item_id}/image", **kwargs)


MakeHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture
def make_harness(aiohttp_client: AiohttpClient) -> MakeHarness:
    async def make(
        clock: Callable[[], float] | None = None,
        wall: Callable[[], float] | None = None,
        **config: Any,
    ) -> Harness:
        config.setdefault("per_minute", None)
        kwargs: dict[str, Any] = {}
        if clock is not None:
            kwargs["clock"] = clock
        if wall is not None:
            kwargs["wall"] = wall
        sim = Simulator(SimConfig(**config), **kwargs)
        client = await aiohttp_client(sim.app)
        return Harness(sim, client)

    return make


# Structural checks of image bytes: what a decoder would walk through.


def check_jpeg(data: bytes) -> None:
    assert data[:2] == b"\xff\xd8"
    assert data[2:4] == b"\xff\xe0" and data[6:11] == b"JFIF\x00"
    pos, markers = 2, []
    while True:
        assert data[pos] == 0xFF
        marker = data[pos + 1]
        markers.append(marker)
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        pos += 2 + length
        if marker == 0xDA:  # start of scan: entropy-coded data runs to EOI
            break
    assert 0xC0 in markers and 0xC4 in markers and 0xDB in markers
    assert data[-2:] == b"\xff\xd9"
    assert pos < len(data) - 2


def check_png(data: bytes) -> None:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds, idat = 8, [], b""
    width = height = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        kinds.append(kind)
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert (depth, colour) == (8, 2)
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert pos == len(data)
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    assert len(zlib.decompress(idat)) == height * (1 + 3 * width)


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    while data[pos] != 0:
        pos += 1 + data[pos]
    return pos + 1


def check_gif(data: bytes) -> None:
    assert data[:6] == b"GIF89a"
    flags = data[10]
    pos = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    images = 0
    while data[pos] != 0x3B:
        if data[pos] == 0x21:
            pos = _skip_sub_blocks(data, pos + 2)
        else:
            assert data[pos] == 0x2C
            assert data[pos + 9] & 0x80 == 0  # no local colour table
            pos = _skip_sub_blocks(data, pos + 11)  # descriptor, then LZW minimum code size
            images += 1
    assert images == 1 and pos == len(data) - 1


def check_webp(data: bytes) -> None:
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
    pos, kinds = 12, []
    while pos < len(data):
        kinds.append(data[pos : pos + 4])
        (length,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        pos += 8 + length + (length & 1)
    assert pos == len(data)
    assert kinds[0] == b"VP8X" and b"VP8L" in kinds


CHECKS = {"jpg": check_jpeg, "png": check_png, "gif": check_gif, "webp": check_webp}


# Images


@pytest.mark.parametrize("kind", KINDS)
def test_rendered_images_are_structurally_valid(kind: str) -> None:
    for size in (30_000, 65_541, 100_001, 300_000):
        data = render(kind, size, "item:doc")
        CHECKS[kind](data)
        assert sniff(data) == kind
        assert size - 1 <= len(data) <= size  # WebP sizes are even
        assert render(kind, size, "item:doc") == data
        assert render(kind, size, "other:doc") != data


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(KINDS), extra=st.integers(min_value=0, max_value=400_000))
def test_any_size_renders_a_valid_image(kind: str, extra: int) -> None:
    size = min_size(kind) + extra
    data = render(kind, size, "k")
    CHECKS[kind](data)
    assert len(data) <= size


# Tokens


async def test_token_success_in_form_body_and_query(make_harness: MakeHarness) -> None:
    h = await make_harness()
    status, body = await h.mint()
    assert status == 200
    assert set(body) == {"access_token", "api_domain", "token_type", "expires_in"}
    assert body["access_token"].startswith("1000.")
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert body["api_domain"].startswith("http://127.0.0.1:")

    response = await h.client.post("/oauth/v2/token", params=TOKEN_FORM)
    by_query = await response.json()
    assert response.status == 200 and by_query["access_token"] != body["access_token"]
    status, _ = await h.get_json("/inventory/v1/items", token=by_query["access_token"])
    assert status == 200
    assert h.sim.stats()["tokens_minted"] == 2


async def test_token_legacy_expiry_in_milliseconds(make_harness: MakeHarness) -> None:
    h = await make_harness(legacy_expires_ms=True, token_ttl=3600)
    status, body = await h.mint()
    assert status == 200
    assert body["expires_in"] == 3_600_000 and body["expires_in_sec"] == 3600


@pytest.mark.parametrize(
    ("field", "error"),
    [
        ("client_id", "invalid_client"),
        ("client_secret", "invalid_client_secret"),
        ("refresh_token", "invalid_code"),
    ],
)
async def test_token_errors_come_with_http_200(
    make_harness: MakeHarness, field: str, error: str
) -> None:
    h = await make_harness()
    status, body = await h.mint(**{field: "1000.wrong"})
    assert (status, body) == (200, {"error": error})
    assert h.sim.stats()["tokens_minted"] == 0


@pytest.mark.parametrize("throttle_status", [200, 400])
async def test_token_throttle_after_ten_mints(
    make_harness: MakeHarness, throttle_status: int
) -> None:
    clock = FakeClock()
    h = await make_harness(clock=clock, throttle_status=throttle_status)
    for _ in range(10):
        status, body = await h.mint()
        assert status == 200 and "access_token" in body
        clock.advance(1)
    status, body = await h.mint()
    assert status == throttle_status
    assert body["error"] == "Access Denied" and body["status"] == "failure"
    assert "too many requests" in body["error_description"]
    clock.advance(899)  # blocked for 900 s from the refused attempt
    status, body = await h.mint()
    assert body.get("error") == "Access Denied"
    clock.advance(1)
    status, body = await h.mint()
    assert status == 200 and "access_token" in body
    assert h.sim.stats()["tokens_minted"] == 11


async def test_token_faults(make_harness: MakeHarness) -> None:
    h = await make_harness()
    for kind in ("invalid_code", "invalid_client", "invalid_client_secret"):
        h.sim.token_fault(kind)
        assert await h.mint() == (200, {"error": kind})
    h.sim.token_fault("throttle")
    status, body = await h.mint()
    assert status == 200 and body["error"] == "Access Denied"
    h.sim.token_fault("error500")
    response = await h.client.post("/oauth/v2/token", data=TOKEN_FORM)
    assert response.status == 500
    h.sim.token_fault(None)
    status, body = await h.mint()
    assert status == 200 and "access_token" in body
    with pytest.raises(ValueError, match="unknown token fault"):
        h.sim.token_fault("nope")
    faults = h.sim.stats()["faults_injected"]
    assert faults["throttle"] == 1 and faults["error500"] == 1


async def test_minting_past_fifteen_live_tokens_revokes_the_oldest(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness(token_throttle_count=100)
    tokens = []
    for _ in range(16):
        _, body = await h.mint()
        tokens.append(body["access_token"])
    status, body = await h.get_json("/inventory/v1/items", token=tokens[0])
    assert (status, body["code"]) == (401, 57)
    status, _ = await h.get_json("/inventory/v1/items", token=tokens[1])
    assert status == 200


async def test_tokens_survive_a_restart_with_the_same_seed(make_harness: MakeHarness) -> None:
    first = Simulator(SimConfig(seed=7))
    token = first.issue_token()
    h = await make_harness(seed=7)
    status, _ = await h.get_json("/inventory/v1/items", token=token)
    assert status == 200
    assert Simulator(SimConfig(seed=8)).tokens.check(token) == "invalid"


async def test_auth_errors_14_and_57(make_harness: MakeHarness) -> None:
    wall = FakeClock(1_700_000_000.0)
    h = await make_harness(wall=wall)
    token = await h.token()
    missing = await h.client.get("/inventory/v1/items", params={"organization_id": ORG})
    assert missing.status == 401 and (await missing.json())["code"] == 14
    for bad in ("garbage", "1000.abcd.ef", token[:-1] + ("0" if token[-1] != "0" else "1")):
        status, body = await h.get_json("/inventory/v1/items", token=bad)
        assert (status, body["code"]) == (401, 14), bad
    bearer = await h.client.get(
        "/inventory/v1/items",
        params={"organization_id": ORG},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert bearer.status == 401 and (await bearer.json())["code"] == 14

    wall.advance(3599)
    assert (await h.get_json("/inventory/v1/items"))[0] == 200
    wall.advance(1)
    status, body = await h.get_json("/inventory/v1/items")
    assert status == 401
    assert body == {"code": 57, "message": "You are not authorized to perform this operation"}

    fresh = h.sim.issue_token()
    assert (await h.get_json("/inventory/v1/items", token=fresh))[0] == 200
    h.sim.revoke_all_tokens()
    assert (await h.get_json("/inventory/v1/items", token=fresh))[1]["code"] == 57
    fresh = h.sim.issue_token()
    h.sim.expire_all_tokens()
    assert (await h.get_json("/inventory/v1/items", token=fresh))[1]["code"] == 57
    assert (await h.get_json("/inventory/v1/items", token=h.sim.issue_token()))[0] == 200


async def test_missing_inventory_scope_answers_57_but_books_works(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness(inventory_scope=False)
    item_id = h.sim.item_ids_with_images()[0]
    status, body = await h.get_json("/inventory/v1/items")
    assert (status, body["code"]) == (401, 57)
    assert (await h.image(item_id)).status == 401
    response = await h.get(f"/books/v3/items/{item_id}/image")
    assert response.status == 200
    assert await response.read() == h.sim.image_bytes(item_id)


@pytest.mark.parametrize("org", [None, "123"])
async def test_organization_id_is_required(make_harness: MakeHarness, org: str | None) -> None:
    h = await make_harness()
    status, body = await h.get_json("/inventory/v1/items", org=org)
    assert (status, body["code"]) == (400, 2)
    assert "organization_id" in body["message"]


# Items list


async def test_pages_through_the_real_catalogue_shape(make_harness: MakeHarness) -> None:
    h = await make_harness()
    items: list[dict[str, Any]] = []
    page = 1
    while True:
        status, body = await h.get_json("/inventory/v1/items", params={"page": str(page)})
        assert status == 200 and body["code"] == 0 and body["message"] == "success"
        context = body["page_context"]
        assert context == {
            "page": page,
            "per_page": 200,
            "has_more_page": context["has_more_page"],
            "report_name": "Items",
            "applied_filter": "Status.All",
            "sort_column": "name",
            "sort_order": "A",
        }
        items.extend(body["items"])
        if not context["has_more_page"]:
            break
        page += 1
    assert page == 12 and len(items) == 2205
    assert len({item["item_id"] for item in items}) == 2205
    assert all(item["item_id"].isdigit() and item["status"] == "active" for item in items)
    names = [item["name"].casefold() for item in items]
    assert names == sorted(names)
    with_image = [item for item in items if item["image_document_id"]]
    assert len(with_image) == 1605
    assert Counter(item["image_type"] for item in with_image) == {"jpg": 1583, "png": 22}
    for item in with_image:
        assert item["image_name"] == f"{item['sku']}-profile.{item['image_type']}"
        assert item["image_document_id"].isdigit() and item["has_attachment"] is True
    for item in items:
        if not item["image_document_id"]:
            assert item["image_name"] == item["image_type"] == ""
    assert len({item["image_document_id"] for item in with_image}) == 1605
    # Images are spread over the catalogue, not the first 1605 items.
    by_index = [i["image_document_id"] != "" for i in sorted(items, key=lambda i: i["item_id"])]
    assert not all(by_index[:1605]) and any(by_index[-200:])
    assert items[0]["last_modified_time"][-5:] == "+0200"
    assert h.sim.stats()["requests"]["items"] == {"200": 12}


async def test_items_parameters(make_harness: MakeHarness) -> None:
    wall = FakeClock(1_750_000_000.0)
    h = await make_harness(wall=wall, items=30, per_page_max=20)
    assert h.sim.config.image_count == round(30 * 1605 / 2205)
    status, body = await h.get_json("/inventory/v1/items", params={"per_page": "500"})
    assert body["page_context"]["per_page"] == 20 and body["page_context"]["has_more_page"]
    status, body = await h.get_json("/inventory/v1/items", params={"page": "2", "per_page": "20"})
    assert len(body["items"]) == 10 and not body["page_context"]["has_more_page"]

    ascending = await h.get_json(
        "/inventory/v1/items", params={"sort_column": "last_modified_time", "per_page": "20"}
    )
    times = [item["last_modified_time"] for item in ascending[1]["items"]]
    assert times == sorted(times)
    descending = await h.get_json(
        "/inventory/v1/items",
        params={"sort_column": "last_modified_time", "sort_order": "D", "per_page": "20"},
    )
    assert descending[1]["page_context"]["sort_order"] == "D"
    assert [i["last_modified_time"] for i in descending[1]["items"]][-1] != times[-1]

    changed = h.sim.items[3]["item_id"]
    h.sim.set_image(changed, "gif")
    for since in ("2025-06-15T15:06:39Z", "2025-06-15T15:06:39+0000"):
        _, body = await h.get_json("/inventory/v1/items", params={"last_modified_time": since})
        assert [item["item_id"] for item in body["items"]] == [changed]
    _, body = await h.get_json(
        "/inventory/v1/items", params={"last_modified_time": "2025-06-15T15:06:40Z"}
    )
    assert body["items"] == []

    _, body = await h.get_json("/inventory/v1/items", params={"filter_by": "Status.Inactive"})
    assert body["items"] == [] and body["page_context"]["applied_filter"] == "Status.Inactive"
    for bad in (
        {"page": "0"},
        {"per_page": "x"},
        {"sort_column": "colour"},
        {"sort_order": "Z"},
        {"filter_by": "Status.Nope"},
        {"last_modified_time": "yesterday"},
    ):
        status, body = await h.get_json("/inventory/v1/items", params=bad)
        assert (status, body["code"]) == (400, 2), bad


def test_catalogue_is_deterministic_from_the_seed() -> None:
    one, two, other = (Simulator(SimConfig(seed=s, items=50)) for s in (3, 3, 4))
    assert one.items == two.items
    assert one.items != other.items
    item_id = one.item_ids_with_images()[0]
    assert one.image_bytes(item_id) == two.image_bytes(item_id)
    assert one.image_bytes(item_id) != other.image_bytes(item_id)


def test_image_sizes_follow_the_real_distribution() -> None:
    sim = Simulator()
    sizes = []
    for item_id in sim.item_ids_with_images():
        data = sim.image_bytes(item_id)
        assert data is not None
        sizes.append(len(data))
    assert min(sizes) >= 30_000 and max(sizes) <= 300_000
    assert 85_000 < sum(sizes) / len(sizes) < 115_000
    assert len(set(sizes)) > 1000


# Images over HTTP


async def test_image_route_serves_the_true_bytes(make_harness: MakeHarness) -> None:
    h = await make_harness()
    items = {item["item_id"]: item for item in h.sim.items}
    png = [i for i, item in items.items() if item["image_type"] == "png"][:3]
    jpg = [i for i, item in items.items() if item["image_type"] == "jpg"][:5]
    gif, webp = jpg.pop(), jpg.pop()
    h.sim.set_image(gif, "gif")
    h.sim.set_image(webp, "webp", size=50_000)
    expected = {**{i: "png" for i in png}, **{i: "jpg" for i in jpg}, gif: "gif", webp: "webp"}
    for item_id, kind in expected.items():
        response = await h.image(item_id)
        body = await response.read()
        assert response.status == 200
        assert response.headers["Content-Type"] == IMAGE_TYPES[kind]
        assert int(response.headers["Content-Length"]) == len(body)
        assert body == h.sim.image_bytes(item_id)
        assert sniff(body) == kind
        CHECKS[kind](body)
        assert 30_000 <= len(body) <= 300_000
    assert len(await (await h.image(webp)).read()) == 50_000
    stats = h.sim.stats()
    assert stats["images_served"] == len(expected) + 1
    assert stats["bytes_served"] == sum(r.bytes_sent for r in h.sim.records)


@pytest.mark.parametrize("style", ["404", "400"])
async def test_image_not_found(make_harness: MakeHarness, style: str) -> None:
    h = await make_harness(not_found_style=style)
    without = next(i["item_id"] for i in h.sim.items if not i["image_document_id"])
    assert h.sim.image_bytes(without) is None
    status, body = await h.get_json(f"/inventory/v1/items/{without}/image")
    assert status == int(style) and body["message"] == "Attachment not found"
    status, body = await h.get_json("/inventory/v1/items/999/image")
    assert (status, body["code"]) == (404, 1002)


async def test_catalogue_edits(make_harness: MakeHarness) -> None:
    wall = FakeClock(1_760_000_000.0)
    h = await make_harness(wall=wall, items=20)
    sim = h.sim
    item_id = sim.item_ids_with_images()[0]
    before = next(i for i in sim.items if i["item_id"] == item_id)
    old_bytes = sim.image_bytes(item_id)
    doc_id = sim.set_image(item_id, "png", size=40_000)
    after = next(i for i in sim.items if i["item_id"] == item_id)
    assert doc_id != before["image_document_id"]
    assert after["image_document_id"] == doc_id and after["image_type"] == "png"
    assert after["last_modified_time"] == "2025-10-09T10:53:20+0200"
    new_bytes = sim.image_bytes(item_id)
    assert new_bytes != old_bytes and new_bytes is not None and len(new_bytes) == 40_000

    sim.remove_image(item_id)
    gone = next(i for i in sim.items if i["item_id"] == item_id)
    assert (gone["image_name"], gone["image_type"], gone["image_document_id"]) == ("", "", "")
    assert (await h.image(item_id)).status == 404

    added = sim.add_item(kind="webp")
    assert added in sim.item_ids_with_images() and len(sim.items) == 21
    response = await h.image(added)
    assert response.headers["Content-Type"] == "image/webp"
    assert sim.add_item("plain-1", with_image=False) == "plain-1"
    with pytest.raises(ValueError, match="already exists"):
        sim.add_item("plain-1")

    sim.remove_item(added)
    status, body = await h.get_json(f"/inventory/v1/items/{added}/image")
    assert (status, body["code"]) == (404, 1002)
    with pytest.raises(KeyError):
        sim.remove_item(added)

    victim = sim.item_ids_with_images()[0]
    truth = sim.image_bytes(victim)
    sim.set_item_field(victim, "item_id", "../x")
    assert "../x" in {i["item_id"] for i in sim.items}
    assert sim.image_bytes("../x") == truth and sim.image_bytes(victim) is None
    sim.set_item_field("../x", "name", None)
    assert next(i for i in sim.items if i["item_id"] == "../x")["name"] is None


# Limits


async def test_rolling_window_429_code_44(make_harness: MakeHarness) -> None:
    clock = FakeClock()
    h = await make_harness(clock=clock, per_minute=5, window_seconds=60.0, retry_after=7)
    remaining = []
    for _ in range(5):
        response = await h.get("/inventory/v1/items", params={"per_page": "1"})
        assert response.status == 200
        remaining.append(response.headers["X-Rate-Limit-Remaining"])
        clock.advance(1)
    assert remaining == ["4", "3", "2", "1", "0"]
    response = await h.get("/inventory/v1/items")
    body = await response.json()
    assert response.status == 429 and body["code"] == 44
    assert body["message"].startswith("For security reasons your organization has been blocked")
    assert response.headers["Retry-After"] == "7"
    assert response.headers["X-Rate-Limit-Limit"] == "5"
    # Rejected arrivals count too: at t=59 the window still holds 6 arrivals.
    clock.now = 1_059.0
    assert (await h.get("/inventory/v1/items")).status == 429
    clock.now = 1_065.0  # the five of t=1000..1004 and the refusal at t=1005 have left
    assert (await h.get("/inventory/v1/items")).status == 200
    stats = h.sim.stats()
    assert stats["max_in_window"] == 7 and h.sim.max_in_window(5.0) == 5
    assert stats["requests"]["items"] == {"200": 6, "429": 2}
    assert stats["api_requests"] == 8


async def test_concurrency_429_code_1070(make_harness: MakeHarness) -> None:
    h = await make_harness(max_concurrent=2)
    first, second = h.sim.item_ids_with_images()[:2]
    h.sim.add_fault("slow", endpoint="image", delay=30)
    held = [asyncio.create_task(h.image(first)), asyncio.create_task(h.image(second))]
    await h.sim.wait_in_flight(2)
    status, body = await h.get_json("/inventory/v1/items")
    assert (status, body["code"]) == (429, 1070)
    assert "in process requests" in body["message"]
    h.sim.release_slow()
    for task in held:
        response = await task
        assert response.status == 200
        await response.read()
    stats = h.sim.stats()
    assert stats["max_in_flight"] == 2 and stats["faults_injected"] == {"slow": 2}
    assert stats["images_served"] == 2
    assert h.sim.in_flight == 0


async def test_latency_makes_requests_overlap(make_harness: MakeHarness) -> None:
    h = await make_harness(latency=0.05, max_concurrent=10)
    ids = h.sim.item_ids_with_images()[:4]
    responses = await asyncio.gather(*(h.image(item_id) for item_id in ids))
    assert [r.status for r in responses] == [200] * 4
    assert h.sim.stats()["max_in_flight"] == 4
    h.sim.update_config(latency=0.0)
    assert h.sim.config.latency == 0.0


async def test_daily_limit_429_code_45(make_harness: MakeHarness) -> None:
    clock = FakeClock(0.0)
    h = await make_harness(clock=clock, daily_limit=3, day_seconds=100.0)
    for _ in range(3):
        assert (await h.get("/inventory/v1/items")).status == 200
    response = await h.get("/inventory/v1/items")
    body = await response.json()
    assert (response.status, body["code"]) == (429, 45)
    assert body["message"].endswith("maximum call rate limit of 3.")
    assert "Retry-After" not in response.headers
    assert (await h.get("/inventory/v1/items")).status == 429
    clock.advance(100)
    assert (await h.get("/inventory/v1/items")).status == 200


async def test_token_and_external_requests_do_not_count(make_harness: MakeHarness) -> None:
    clock = FakeClock()
    h = await make_harness(clock=clock, per_minute=2)
    h.sim.set_external("photo.jpg", render("jpg", 40_000, "ext"))
    for _ in range(3):
        assert (await h.mint())[0] == 200
        assert (await h.client.get("/ext/photo.jpg")).status == 200
        assert (await h.client.get("/__sim/stats")).status == 200
    assert (await h.get("/inventory/v1/items")).status == 200
    assert (await h.get("/inventory/v1/items")).status == 200
    assert (await h.get("/inventory/v1/items")).status == 429
    assert h.sim.stats()["api_requests"] == 3


# Faults


async def test_status_fault_with_times(make_harness: MakeHarness) -> None:
    h = await make_harness()
    item_id, other = h.sim.item_ids_with_images()[:2]
    h.sim.add_fault("status", item_id, times=2, status=503, body="busy")
    for _ in range(2):
        response = await h.image(item_id)
        assert response.status == 503 and await response.text() == "busy"
    assert (await h.image(other)).status == 200
    assert (await h.image(item_id)).status == 200
    h.sim.add_fault("status", endpoint="books")
    status, body = await h.get_json(f"/books/v3/items/{item_id}/image")
    assert status == 500 and "code" in body
    assert h.sim.stats()["faults_injected"] == {"status": 3}


async def test_reset_fault_drops_the_connection(make_harness: MakeHarness) -> None:
    h = await make_harness()
    item_id = h.sim.item_ids_with_images()[0]
    h.sim.add_fault("reset", item_id, times=1)
    with pytest.raises(aiohttp.ClientConnectionError):
        await h.image(item_id)
    assert (await h.image(item_id)).status == 200
    record = h.sim.records[0]
    assert (record.status, record.fault, record.bytes_sent) == (0, "reset", 0)


async def test_truncate_fault_sends_half_the_declared_length(make_harness: MakeHarness) -> None:
    h = await make_harness()
    item_id = h.sim.item_ids_with_images()[0]
    full = h.sim.image_bytes(item_id)
    assert full is not None
    h.sim.add_fault("truncate", item_id, times=1)
    response = await h.image(item_id)
    assert response.status == 200 and response.content_length == len(full)
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert h.sim.records[0].bytes_sent == len(full) // 2
    again = await h.image(item_id)
    assert await again.read() == full
    assert h.sim.stats()["images_served"] == 1


async def test_truncate_fault_on_the_items_list(make_harness: MakeHarness) -> None:
    h = await make_harness()
    h.sim.add_fault("truncate", endpoint="items", page=2, times=1)
    assert (await h.get_json("/inventory/v1/items"))[0] == 200
    response = await h.get("/inventory/v1/items", params={"page": "2"})
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert (await h.get_json("/inventory/v1/items", params={"page": "2"}))[0] == 200


async def test_slow_fault_delays_then_serves(make_harness: MakeHarness) -> None:
    h = await make_harness()
    item_id = h.sim.item_ids_with_images()[0]
    delay = 0.2
    h.sim.add_fault("slow", item_id, delay=delay)
    t0 = time.monotonic()
    response = await h.image(item_id)
    elapsed = time.monotonic() - t0
    assert response.status == 200 and await response.read() == h.sim.image_bytes(item_id)
    # The client's span contains the server's hold, which lasts at least the delay.
    assert elapsed >= delay, elapsed
    assert h.sim.records[0].fault == "slow"


@pytest.mark.parametrize(
    ("kind", "params", "status", "content_type"),
    [
        ("json200", {}, 200, "application/json"),
        ("html200", {}, 200, "text/html"),
        ("empty", {}, 200, "image/jpeg"),
        ("oversize", {"size": 500_000}, 200, "image/jpeg"),
        ("not_found", {}, 404, "application/json"),
        ("wrong_type", {}, 200, "image/png"),
    ],
)
async def test_body_faults(
    make_harness: MakeHarness,
    kind: str,
    params: dict[str, Any],
    status: int,
    content_type: str,
) -> None:
    h = await make_harness()
    item_id = next(i["item_id"] for i in h.sim.items if i["image_type"] == "jpg")
    h.sim.add_fault(kind, item_id, **params)
    response = await h.image(item_id)
    body = await response.read()
    assert response.status == status
    assert response.content_type == content_type
    truth = h.sim.image_bytes(item_id)
    if kind == "json200":
        assert body.startswith(b"{") and b'"code":0' in body
    elif kind == "html200":
        assert body.startswith(b"<!DOCTYPE html>")
    elif kind == "empty":
        assert body == b""
    elif kind == "oversize":
        assert len(body) == 500_000 and sniff(body) == "jpg"
        check_jpeg(body)
    elif kind == "not_found":
        assert b"Attachment not found" in body
    else:
        assert body == truth and sniff(body) == "jpg"
    assert h.sim.records[-1].fault == kind
    served = 1 if kind == "wrong_type" else 0
    assert h.sim.stats()["images_served"] == served


@pytest.mark.parametrize("code", [44, 45, 1070])
async def test_forced_429_fault(make_harness: MakeHarness, code: int) -> None:
    h = await make_harness(daily_limit=1000)
    h.sim.add_fault("429", endpoint="items", code=code, times=1)
    status, body = await h.get_json("/inventory/v1/items")
    assert (status, body["code"]) == (429, code)
    assert (await h.get_json("/inventory/v1/items"))[0] == 200


async def test_random_faults_for_a_soak(make_harness: MakeHarness) -> None:
    h = await make_harness(items=40)
    ids = h.sim.item_ids_with_images()
    h.sim.add_fault("random", rate=0.5, kinds=["status", "json200", "not_found"], seed=5)
    statuses: Counter[int] = Counter()
    for item_id in ids * 2:
        response = await h.image(item_id)
        await response.read()
        statuses[response.status] += 1
    stats = h.sim.stats()
    injected = stats["faults_injected"]
    assert set(injected) <= {"status", "json200", "not_found"}
    assert 0.25 * len(ids) * 2 < sum(injected.values()) < 0.75 * len(ids) * 2
    assert statuses[500] == injected.get("status", 0)
    assert statuses[404] == injected.get("not_found", 0)
    assert stats["images_served"] == len(ids) * 2 - sum(injected.values())


def test_fault_arguments_are_validated() -> None:
    sim = Simulator(SimConfig(items=5))
    with pytest.raises(ValueError, match="unknown fault kind"):
        sim.add_fault("explode")
    with pytest.raises(ValueError, match="unknown endpoint"):
        sim.add_fault("status", endpoint="orders")
    with pytest.raises(ValueError, match="takes no parameter"):
        sim.add_fault("reset", delay=3)
    with pytest.raises(ValueError, match="needs an image endpoint"):
        sim.add_fault("oversize", endpoint="items")
    with pytest.raises(ValueError, match="429 code"):
        sim.add_fault("429", code=99)
    with pytest.raises(ValueError, match="times"):
        sim.add_fault("status", times=0)
    assert len(sim.faults) == 0


async def test_external_images_and_their_faults(make_harness: MakeHarness) -> None:
    h = await make_harness()
    data = render("png", 35_000, "ext")
    h.sim.set_external("shop/a.png", data, "image/png")
    response = await h.client.get("/ext/shop/a.png")
    assert response.status == 200 and response.content_type == "image/png"
    assert await response.read() == data
    assert (await h.client.get("/ext/missing.jpg")).status == 404
    h.sim.add_fault("html200", "shop/a.png", endpoint="external", times=1)
    assert (await h.client.get("/ext/shop/a.png")).content_type == "text/html"
    stats = h.sim.stats()
    assert stats["requests"]["external"] == {"200": 2, "404": 1}
    assert stats["api_requests"] == 0 and stats["images_served"] == 1


# Log, statistics, admin routes, lifecycle


async def test_request_log_and_stats(make_harness: MakeHarness) -> None:
    clock = FakeClock()
    h = await make_harness(clock=clock)
    item_id = h.sim.item_ids_with_images()[0]
    await h.mint()
    await h.get_json("/inventory/v1/items", params={"page": "3"})
    clock.advance(2)
    image = await h.image(item_id)
    size = len(await image.read())
    await h.get_json("/inventory/v1/items/nope/image")
    await h.client.get("/no/such/route")
    records = h.sim.records
    assert [r.endpoint for r in records] == ["token", "items", "image", "image", "other"]
    assert records[1] == RequestRecord(
        t=1_000.0,
        endpoint="items",
        path="/inventory/v1/items",
        item_id=None,
        page=3,
        status=200,
        zoho_code=0,
        bytes_sent=records[1].bytes_sent,
        fault=None,
        authorized=True,  # the harness sends the token
    )
    assert records[0].authorized is False  # the token request: credentials in the form
    assert records[2].item_id == item_id and records[2].bytes_sent == size
    assert records[2].t == 1_002.0 and records[3].zoho_code == 1002
    assert records[2].to_dict()["endpoint"] == "image"
    stats = h.sim.stats()
    assert stats == {
        "tokens_minted": 1,
        "requests": {
            "image": {"200": 1, "404": 1},
            "items": {"200": 1},
            "other": {"404": 1},
            "token": {"200": 1},
        },
        "api_requests": 3,
        "images_served": 1,
        "bytes_served": size,
        "bytes_sent": sum(r.bytes_sent for r in records),
        "faults_injected": {},
        "max_in_flight": 1,
        "max_in_window": 3,
    }
    h.sim.reset_log()
    assert h.sim.records == [] and h.sim.stats()["tokens_minted"] == 0


async def test_admin_routes(make_harness: MakeHarness) -> None:
    h = await make_harness(items=10)
    client = h.client
    item_id = h.sim.item_ids_with_images()[0]

    listing = await (await client.get("/__sim/items")).json()
    assert listing["count"] == 10 and listing["items"] == h.sim.items
    truth = await client.get(f"/__sim/image/{item_id}")
    assert truth.content_type == "image/jpeg"
    assert await truth.read() == h.sim.image_bytes(item_id)
    no_image = next(i["item_id"] for i in h.sim.items if not i["image_document_id"])
    assert (await client.get(f"/__sim/image/{no_image}")).status == 404

    fault = {"kind": "status", "item_id": item_id, "times": 1, "status": 502}
    assert (await client.post("/__sim/faults", json=fault)).status == 200
    assert (await h.image(item_id)).status == 502
    await client.post("/__sim/faults", json={"kind": "not_found"})
    await client.post("/__sim/faults/clear")
    assert (await h.image(item_id)).status == 200
    bad = await client.post("/__sim/faults", json={"kind": "explode"})
    assert bad.status == 400 and "unknown fault kind" in (await bad.json())["error"]

    reply = await client.post(
        "/__sim/catalogue", json={"op": "set_image", "item_id": item_id, "kind": "gif"}
    )
    doc_id = (await reply.json())["image_document_id"]
    assert next(i for i in h.sim.items if i["item_id"] == item_id)["image_document_id"] == doc_id
    added = await (await client.post("/__sim/catalogue", json={"op": "add_item"})).json()
    assert added["item_id"] in h.sim.item_ids_with_images()
    ops: list[dict[str, Any]] = [
        {"op": "remove_image", "item_id": added["item_id"]},
        {"op": "set_item_field", "item_id": added["item_id"], "key": "sku", "value": "Q1"},
        {"op": "remove_item", "item_id": added["item_id"]},
        {"op": "set_external", "name": "x.webp", "kind": "webp", "size": 40_000},
        {
            "op": "set_external",
            "name": "raw.bin",
            "data_base64": base64.b64encode(b"raw").decode(),
            "content_type": "application/octet-stream",
        },
    ]
    for op in ops:
        assert (await client.post("/__sim/catalogue", json=op)).status == 200, op
    assert (await (await client.get("/ext/x.webp")).read())[8:12] == b"WEBP"
    assert await (await client.get("/ext/raw.bin")).read() == b"raw"
    missing = await client.post("/__sim/catalogue", json={"op": "remove_item", "item_id": "zz"})
    assert missing.status == 400

    token = (await (await client.post("/__sim/tokens", json={"op": "issue"})).json())[
        "access_token"
    ]
    assert (await h.get_json("/inventory/v1/items", token=token))[0] == 200
    await client.post("/__sim/tokens", json={"op": "revoke_all"})
    assert (await h.get_json("/inventory/v1/items", token=token))[1]["code"] == 57
    await client.post("/__sim/tokens", json={"op": "fault", "kind": "invalid_code"})
    assert (await h.mint())[1] == {"error": "invalid_code"}
    await client.post("/__sim/tokens", json={"op": "fault", "kind": None})
    await client.post("/__sim/tokens", json={"op": "expire_all"})

    changed = await client.post("/__sim/config", json={"per_minute": 1, "retry_after": 3})
    assert (await changed.json())["per_minute"] == 1 and h.sim.config.retry_after == 3
    refused = await client.post("/__sim/config", json={"seed": 2})
    assert refused.status == 400
    shown = await (await client.get("/__sim/config")).json()
    assert "client_secret" not in shown and shown["per_minute"] == 1

    stats = await (await client.get("/__sim/stats")).json()
    assert stats["api_requests"] == h.sim.stats()["api_requests"]
    log = await (await client.get("/__sim/log", params={"since": "1"})).json()
    assert log["total"] >= len(log["records"]) + 1
    assert {"t", "endpoint", "path", "status", "fault"} <= set(log["records"][0])
    assert (await client.post("/__sim/log/reset")).status == 200
    assert (await client.post("/__sim/release")).status == 200
    assert [r.endpoint for r in h.sim.records] == ["admin", "admin"]


async def test_start_serves_real_zoho_paths() -> None:
    sim = Simulator(SimConfig(items=5, per_minute=None))
    base = await sim.start()
    try:
        assert base.startswith("http://127.0.0.1:") and sim.base_url == base
        assert sim.accounts_url == base
        assert sim.api_url == base + "/inventory/v1"
        assert sim.books_url == base + "/books/v3"
        async with aiohttp.ClientSession() as session:
            async with session.post(sim.accounts_url + "/oauth/v2/token", data=TOKEN_FORM) as r:
                token = (await r.json())["access_token"]
                assert (await r.json())["api_domain"] == base
            headers = {"Authorization": f"Zoho-oauthtoken {token}"}
            params = {"organization_id": ORG}
            async with session.get(sim.api_url + "/items", headers=headers, params=params) as r:
                assert len((await r.json())["items"]) == 5
    finally:
        await sim.stop()
    await sim.stop()  # idempotent
    with pytest.raises(RuntimeError):
        _ = Simulator().base_url


async def test_run_simulator_serves_until_cancelled() -> None:
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_simulator(SimConfig(items=3), port=0, ready=ready.set_result))
    base = await ready
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/__sim/stats") as response:
            assert (await response.json())["api_requests"] == 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(base + "/__sim/stats"):
                pass


def test_config_is_validated() -> None:
    assert SimConfig().image_count == 1605 and SimConfig().png_count == 22
    assert SimConfig(items=100, with_images=7).image_count == 7
    with pytest.raises(ValueError, match="with_images"):
        SimConfig(items=5, with_images=6)
    with pytest.raises(ValueError, match="not_found_style"):
        SimConfig(not_found_style="500")
    with pytest.raises(ValueError, match="min_image_bytes"):
        SimConfig(min_image_bytes=10, max_image_bytes=5)
