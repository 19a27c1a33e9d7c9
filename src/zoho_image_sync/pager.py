"""The catalogue producer: walks every page (or the items file) and yields items.

Items come out as ``CatalogueItem`` values, one page at a time, so memory stays flat
however long the catalogue is; the caller feeds them into a bounded queue.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from .errors import ConfigError
from .zoho import ZohoClient

log = structlog.get_logger(__name__)

PER_PAGE: Final = 200
_MISSING: Final = object()


@dataclass(frozen=True, slots=True)
class CatalogueItem:
    """One catalogue entry, normalised from Zoho's JSON or the ERP's export."""

    item_id: str
    name: str = ""
    sku: str = ""
    image_name: str = ""
    image_type: str = ""
    image_document_id: str = ""
    image_url: str = ""
    from_url_map: bool = False

    @classmethod
    def from_zoho(cls, raw: Mapping[str, Any]) -> CatalogueItem:
        """From an item of the Inventory items list (or the ERP's export shape)."""
        get = raw.get
        # The ERP's export names Zoho's id zoho_item_id, and may carry an item_id of its
        # own: zoho_item_id wins when it has a value (the contract's order, and the key
        # export's merge matches on). Zoho's items list has item_id only.
        item_id = get("zoho_item_id")
        if item_id is None or item_id == "":
            item_id = get("item_id")
        if type(item_id) is not str:
            if isinstance(item_id, bool) or not isinstance(item_id, str | int):
                item_id = ""  # missing, null, or not an id at all: refused as bad_item_id
            item_id = str(item_id)
        name = get("name", _MISSING)
        if name is _MISSING:
            name = get("name_en")
        sku = get("sku", _MISSING)
        if sku is _MISSING:
            sku = get("code")
        image_name, image_type = get("image_name"), get("image_type")
        doc_id, image_url = get("image_document_id"), get("image_url")
        # Once per catalogue item per pass: plain strings (Zoho's case) skip _text.
        return cls(
            item_id,
            name if type(name) is str else _text(name),
            sku if type(sku) is str else _text(sku),
            image_name if type(image_name) is str else _text(image_name),
            image_type if type(image_type) is str else _text(image_type),
            doc_id if type(doc_id) is str else _text(doc_id),
            image_url if type(image_url) is str else _text(image_url),
        )

    @property
    def has_zoho_image(self) -> bool:
        """Zoho lists an image for this item."""
        return bool(self.image_document_id or self.image_name)


def _text(value: object) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


Pages = AsyncIterator[tuple[int, list["CatalogueItem"]]]
"""(page number, items) pairs from the Zoho API or an items file."""


async def zoho_pages(client: ZohoClient, extra: dict[str, str] | None = None) -> Pages:
    """Every page of the item list, until ``has_more_page`` is false."""
    page = 1
    while True:
        raw_items, has_more = await client.items_page(page, PER_PAGE, extra)
        items = [CatalogueItem.from_zoho(r) for r in raw_items if isinstance(r, Mapping)]
        if len(items) != len(raw_items):
            log.warning("items page held non-object entries", page=page)
        yield page, items
        if not has_more:
            return
        page += 1


def load_url_map(path: str) -> dict[str, str]:
    """The hand-made ``image_urls.json``: ``{"<item id>": "https://..."}``."""
    if not path:
        return {}
    try:
        doc = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise ConfigError("source.url_map", f"file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError("source.url_map", f"cannot read {path} as JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError("source.url_map", f"{path} must hold a JSON object {{id: url}}")
    out: dict[str, str] = {}
    for key, value in doc.items():
        if isinstance(value, str) and value.strip():
            out[str(key)] = value.strip()
        else:
            log.warning("url_map entry is not a URL string; ignored", item_id=str(key)[:80])
    return out
