"""The simulated item catalogue: deterministic items, their images, and edits to both."""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from .config import SimConfig
from .images import CONTENT_TYPES, ImageCache, normalise_kind

# Zoho answers in the organisation's time zone; the real account is on UTC+2.
ORG_TZ = timezone(timedelta(hours=2))
ITEM_ID_PREFIX = "4265011000000"
_DOC_ID_PREFIX = "4265011"
_EPOCH = datetime(2023, 1, 1, tzinfo=UTC).timestamp()
_SPAN = 420 * 86_400

SORT_COLUMNS = ("name", "sku", "last_modified_time")
FILTERS = ("Status.All", "Status.Active", "Status.Inactive")

_ADJECTIVES = (
    "Heavy", "Light", "Compact", "Premium", "Classic", "Industrial", "Slim", "Large",
    "Small", "Pro", "Eco", "Deluxe", "Standard", "Mini", "Ultra", "Smart",
)  # fmt: skip
_MATERIALS = (
    "Steel", "Brass", "Copper", "Oak", "Glass", "Ceramic", "Cotton", "Leather",
    "Aluminium", "Bamboo", "Marble", "Plastic", "Wool", "Linen", "Iron", "Walnut",
)  # fmt: skip
_NOUNS = (
    "Lamp", "Chair", "Table", "Vase", "Bowl", "Mug", "Shelf", "Rug", "Clock", "Mirror",
    "Basket", "Tray", "Stool", "Cushion", "Kettle", "Jar", "Frame", "Bench", "Hook", "Bolt",
)  # fmt: skip


def format_time(epoch: float) -> str:
    """Zoho's timestamp format: 2024-02-26T15:44:57+0200."""
    return datetime.fromtimestamp(epoch, ORG_TZ).strftime("%Y-%m-%dT%H:%M:%S%z")


def parse_time(text: str) -> float:
    """Parse yyyy-MM-ddTHH:mm:ssZ or ...+0000 (a "+" may arrive as a space from a URL)."""
    text = text.strip().replace(" ", "+")
    if text.endswith("Z"):
        text = text[:-1] + "+0000"
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp()


@dataclass
class _Image:
    kind: str
    size: int
    doc_id: str


@dataclass
class _Entry:
    fields: dict[str, Any]
    mtime: float
    image: _Image | None
    key: str  # the item's first id: image bytes stay stable if a test renames the item


class Catalogue:
    """Items as Zoho lists them, plus the true bytes of every image."""

    def __init__(self, config: SimConfig, wall: Callable[[], float]) -> None:
        self._seed = config.seed
        self._min_bytes = config.min_image_bytes
        self._max_bytes = config.max_image_bytes
        self._wall = wall
        self._rng = random.Random(f"catalogue:{config.seed}")
        self._entries: dict[str, _Entry] = {}
        self._cache = ImageCache(64)
        self._orders: dict[tuple[str, str], list[str]] = {}
        self._next_index = 0
        self._next_doc = 1_000_000_000 + self._rng.randrange(10**8)
        self._build(config)

    def _build(self, config: SimConfig) -> None:
        rng = self._rng
        with_image = set(rng.sample(range(config.items), config.image_count))
        png = set(rng.sample(sorted(with_image), config.png_count))
        for index in range(config.items):
            kind = "png" if index in png else "jpg"
            mtime = float(int(_EPOCH + rng.uniform(0, _SPAN)))
            self._create(None, index in with_image, kind, mtime)

    def _new_doc_id(self) -> str:
        self._next_doc += self._rng.randint(1, 97)
        return f"{_DOC_ID_PREFIX}{self._next_doc:012d}"

    def _new_image(self, key: str, kind: str, size: int | None) -> _Image:
        doc_id = self._new_doc_id()
        if size is None:
            rng = random.Random(f"size:{self._seed}:{key}:{doc_id}")
            # Skewed towards small files: mean about 26% of the way up the range,
            # 100 KB for the default 30-300 KB, like the real export.
            share = rng.betavariate(2.0, 5.7)
            size = self._min_bytes + int(share * (self._max_bytes - self._min_bytes))
            if kind == "webp" and size % 2:
                size = size - 1 if size - 1 >= self._min_bytes else size + 1
        return _Image(kind=kind, size=size, doc_id=doc_id)

    def _create(self, item_id: str | None, with_image: bool, kind: str, mtime: float) -> str:
        index = self._next_index
        self._next_index += 1
        if item_id is None:
            item_id = f"{ITEM_ID_PREFIX}{index:06d}"
        rng = random.Random(f"item:{self._seed}:{index}")
        name = " ".join((rng.choice(_ADJECTIVES), rng.choice(_MATERIALS), rng.choice(_NOUNS)))
        sku = f"Z{index + 1:04d}"
        fields: dict[str, Any] = {
            "item_id": item_id,
            "name": name,
            "sku": sku,
            "status": "active",
            "unit": "pcs",
            "rate": round(rng.uniform(1, 500), 2),
            "product_type": "goods",
            "last_modified_time": format_time(mtime),
            "image_name": "",
            "image_type": "",
            "image_document_id": "",
            "has_attachment": False,
        }
        entry = _Entry(fields=fields, mtime=mtime, image=None, key=item_id)
        self._entries[item_id] = entry
        if with_image:
            self._attach(entry, self._new_image(item_id, normalise_kind(kind), None))
        self._orders.clear()
        return item_id

    def _attach(self, entry: _Entry, image: _Image | None) -> None:
        entry.image = image
        fields = entry.fields
        if image is None:
            fields.update(image_name="", image_type="", image_document_id="")
            fields["has_attachment"] = False
        else:
            fields["image_name"] = f"{fields.get('sku', '')}-profile.{image.kind}"
            fields["image_type"] = image.kind
            fields["image_document_id"] = image.doc_id
            fields["has_attachment"] = True

    def _touch(self, entry: _Entry) -> None:
        # Zoho keeps whole seconds; a fraction would make "modified after" filters leak.
        entry.mtime = float(int(self._wall()))
        entry.fields["last_modified_time"] = format_time(entry.mtime)
        self._orders.clear()

    def _entry(self, item_id: str) -> _Entry:
        try:
            return self._entries[item_id]
        except KeyError:
            raise KeyError(f"no item {item_id!r} in the catalogue") from None

    # Reading

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def items(self) -> list[dict[str, Any]]:
        """Every item as served, in catalogue order (copies)."""
        return [dict(entry.fields) for entry in self._entries.values()]

    def item_ids_with_images(self) -> list[str]:
        """Ids of the items that currently have an image."""
        return [key for key, entry in self._entries.items() if entry.image is not None]

    def has_item(self, item_id: str) -> bool:
        """Whether the id names a catalogue item."""
        return item_id in self._entries

    def field(self, item_id: str, key: str) -> Any:
        """One served field of an item (None when absent)."""
        return self._entry(item_id).fields.get(key)

    def image(self, item_id: str) -> tuple[bytes, str] | None:
        """The image bytes and Content-Type, or None when the item has none or is unknown."""
        entry = self._entries.get(item_id)
        if entry is None or entry.image is None:
            return None
        image = entry.image
        key = f"{self._seed}:{entry.key}:{image.doc_id}"
        return self._cache.get(image.kind, image.size, key), CONTENT_TYPES[image.kind]

    def image_bytes(self, item_id: str) -> bytes | None:
        """Exactly the bytes the image route serves for this item now."""
        found = self.image(item_id)
        return None if found is None else found[0]

    def page(
        self,
        page: int,
        per_page: int,
        sort_column: str = "name",
        sort_order: str = "A",
        filter_by: str = "Status.All",
        modified_after: float | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """One page of items (copies) and whether another page follows."""
        ids = self._order(sort_column, sort_order)
        if filter_by != "Status.All" or modified_after is not None:
            wanted = {"Status.Active": "active", "Status.Inactive": "inactive"}.get(filter_by)
            ids = [
                key
                for key in ids
                if (wanted is None or self._entries[key].fields.get("status") == wanted)
                and (modified_after is None or self._entries[key].mtime > modified_after)
            ]
        start = (page - 1) * per_page
        chunk = ids[start : start + per_page]
        return [dict(self._entries[key].fields) for key in chunk], start + per_page < len(ids)

    def _order(self, sort_column: str, sort_order: str) -> list[str]:
        cached = self._orders.get((sort_column, sort_order))
        if cached is not None:
            return cached

        def sort_key(key: str) -> tuple[Any, str]:
            entry = self._entries[key]
            if sort_column == "last_modified_time":
                return entry.mtime, key
            return str(entry.fields.get(sort_column, "")).casefold(), key

        ids = sorted(self._entries, key=sort_key, reverse=sort_order == "D")
        self._orders[(sort_column, sort_order)] = ids
        return ids

    # Editing

    def set_image(self, item_id: str, kind: str = "jpg", size: int | None = None) -> str:
        """Give the item a new image (new document id); returns that id."""
        entry = self._entry(item_id)
        image = self._new_image(entry.key, normalise_kind(kind), size)
        self._attach(entry, image)
        self._touch(entry)
        return image.doc_id

    def remove_image(self, item_id: str) -> None:
        """Take the item's image away."""
        entry = self._entry(item_id)
        self._attach(entry, None)
        self._touch(entry)

    def add_item(
        self, item_id: str | None = None, with_image: bool = True, kind: str = "jpg"
    ) -> str:
        """Append a new item, modified now; returns its id."""
        if item_id is not None and item_id in self._entries:
            raise ValueError(f"item {item_id!r} already exists")
        return self._create(item_id, with_image, kind, float(int(self._wall())))

    def remove_item(self, item_id: str) -> None:
        """Delete an item from the catalogue."""
        self._entry(item_id)
        del self._entries[item_id]
        self._orders.clear()

    def set_item_field(self, item_id: str, key: str, value: Any) -> None:
        """Overwrite one served field (renaming the item when key is item_id)."""
        entry = self._entry(item_id)
        if key == "item_id":
            new_id = str(value)
            if new_id != item_id and new_id in self._entries:
                raise ValueError(f"item {new_id!r} already exists")
            entry.fields[key] = value
            self._entries = {
                (new_id if old == item_id else old): other for old, other in self._entries.items()
            }
        else:
            entry.fields[key] = value
        if key == "last_modified_time" and isinstance(value, str):
            # A deliberately malformed time keeps sorting by the old one.
            with suppress(ValueError):
                entry.mtime = parse_time(value)
        self._orders.clear()
