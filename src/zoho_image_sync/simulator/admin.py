"""/__sim/* routes: drive and inspect a simulator running in another process.

Not part of Zoho's API: not rate limited and not counted as API requests.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .config import RUNTIME_KEYS
from .images import CONTENT_TYPES, normalise_kind, render

if TYPE_CHECKING:
    from .app import Simulator

_HIDDEN_CONFIG = frozenset({"client_secret", "refresh_token"})


@dataclass(frozen=True)
class Reply:
    """An admin answer: JSON data, or raw bytes with their Content-Type."""

    status: int
    data: Any
    content_type: str | None = None


Handler = Callable[["Simulator", web.Request], Awaitable[Reply]]


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    data = await request.json()
    if not isinstance(data, dict):
        raise ValueError("the request body must be a JSON object")
    return data


async def stats(sim: Simulator, request: web.Request) -> Reply:
    """GET /__sim/stats: Simulator.stats()."""
    return Reply(200, sim.stats())


async def log(sim: Simulator, request: web.Request) -> Reply:
    """GET /__sim/log[?since=N]: the request log from record N on."""
    since = int(request.query.get("since", "0"))
    records = sim.records
    return Reply(200, {"total": len(records), "records": [r.to_dict() for r in records[since:]]})


async def reset_log(sim: Simulator, request: web.Request) -> Reply:
    """POST /__sim/log/reset: forget the log and counters."""
    sim.reset_log()
    return Reply(200, {"ok": True})


async def items(sim: Simulator, request: web.Request) -> Reply:
    """GET /__sim/items: the full catalogue as served."""
    catalogue = sim.items
    return Reply(200, {"count": len(catalogue), "items": catalogue})


async def image(sim: Simulator, request: web.Request) -> Reply:
    """GET /__sim/image/{item_id}: the true image bytes, 404 when the item has none."""
    found = sim.catalogue.image(request.match_info["item_id"])
    if found is None:
        return Reply(404, {"error": "no image"})
    return Reply(200, found[0], found[1])


async def add_fault(sim: Simulator, request: web.Request) -> Reply:
    """POST /__sim/faults {"kind", "item_id", "endpoint", "times", params...}."""
    body = await _json_body(request)
    kind = body.pop("kind")
    item_id = body.pop("item_id", None)
    endpoint = body.pop("endpoint", "image")
    times = body.pop("times", None)
    sim.add_fault(kind, item_id, endpoint=endpoint, times=times, **body)
    return Reply(200, {"ok": True, "faults": len(sim.faults)})


async def clear_faults(sim: Simulator, request: web.Request) -> Reply:
    """POST /__sim/faults/clear."""
    sim.clear_faults()
    return Reply(200, {"ok": True})


async def catalogue(sim: Simulator, request: web.Request) -> Reply:
    """POST /__sim/catalogue {"op": set_image|remove_image|add_item|remove_item|
    set_item_field|set_external, ...}."""
    body = await _json_body(request)
    op = body.pop("op", None)
    if op == "set_image":
        return Reply(200, {"image_document_id": sim.set_image(**body)})
    if op == "remove_image":
        sim.remove_image(**body)
        return Reply(200, {"ok": True})
    if op == "add_item":
        return Reply(200, {"item_id": sim.add_item(**body)})
    if op == "remove_item":
        sim.remove_item(**body)
        return Reply(200, {"ok": True})
    if op == "set_item_field":
        sim.set_item_field(**body)
        return Reply(200, {"ok": True})
    if op == "set_external":
        name = body.pop("name")
        if "data_base64" in body:
            data = base64.b64decode(body.pop("data_base64"), validate=True)
            content_type = body.pop("content_type", "image/jpeg")
        else:
            kind = normalise_kind(body.pop("kind", "jpg"))
            data = render(kind, int(body.pop("size", 50_000)), f"external:{name}")
            content_type = body.pop("content_type", CONTENT_TYPES[kind])
        if body:
            raise ValueError(f"unexpected keys: {', '.join(sorted(body))}")
        return Reply(200, {"path": sim.set_external(name, data, content_type)})
    raise ValueError(f"unknown catalogue op {op!r}")


async def tokens(sim: Simulator, request: web.Request) -> Reply:
    """POST /__sim/tokens {"op": revoke_all|expire_all|fault|issue, "kind": ...}."""
    body = await _json_body(request)
    op = body.get("op")
    if op == "revoke_all":
        sim.revoke_all_tokens()
    elif op == "expire_all":
        sim.expire_all_tokens()
    elif op == "fault":
        sim.token_fault(body.get("kind"))
    elif op == "issue":
        return Reply(200, {"access_token": sim.issue_token()})
    else:
        raise ValueError(f"unknown tokens op {op!r}")
    return Reply(200, {"ok": True})


async def get_config(sim: Simulator, request: web.Request) -> Reply:
    """GET /__sim/config: the settings in force (secrets left out)."""
    shown = {
        key: value
        for key, value in dataclasses.asdict(sim.config).items()
        if key not in _HIDDEN_CONFIG
    }
    return Reply(200, shown)


async def set_config(sim: Simulator, request: web.Request) -> Reply:
    """POST /__sim/config {per_minute, max_concurrent, daily_limit, retry_after, ...}."""
    body = await _json_body(request)
    config = sim.update_config(**body)
    return Reply(200, {key: getattr(config, key) for key in sorted(RUNTIME_KEYS)})


async def release(sim: Simulator, request: web.Request) -> Reply:
    """POST /__sim/release: let requests held by "slow" faults finish."""
    sim.release_slow()
    return Reply(200, {"ok": True})


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/__sim/stats", stats),
    ("GET", "/__sim/log", log),
    ("POST", "/__sim/log/reset", reset_log),
    ("GET", "/__sim/items", items),
    ("GET", "/__sim/image/{item_id}", image),
    ("POST", "/__sim/faults", add_fault),
    ("POST", "/__sim/faults/clear", clear_faults),
    ("POST", "/__sim/catalogue", catalogue),
    ("POST", "/__sim/tokens", tokens),
    ("GET", "/__sim/config", get_config),
    ("POST", "/__sim/config", set_config),
    ("POST", "/__sim/release", release),
)
