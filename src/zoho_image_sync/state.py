"""The JSON checkpoint: what we hold for every item, written atomically (mode 0600).

Entries are treated as immutable: an update replaces the item's dict, so a save
only needs a shallow copy of ``items`` on the event loop and encodes it in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import structlog

from .storage import write_bytes_atomic

STATE_VERSION: Final = 1
STATUSES: Final = ("downloaded", "no_image", "failed", "pending")

log = structlog.get_logger(__name__)


class StateCorrupt(Exception):
    """The state file exists but cannot be read as our checkpoint."""


class State:
    """Items and pass bookkeeping, persisted to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: dict[str, Mapping[str, Any]] = {}
        self.last_pass: dict[str, Any] | None = None
        self.meta: dict[str, Any] = {}
        self.dirty = 0
        self.recovered_from: Path | None = None
        self._save_lock = asyncio.Lock()
        self.last_save_seconds = 0.0

    # -- reading -----------------------------------------------------------------

    @classmethod
    def read(cls, path: Path) -> State:
        """Load the checkpoint; a missing file is an empty state, a bad one raises."""
        state = cls(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return state
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StateCorrupt(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("items"), dict):
            raise StateCorrupt(f"{path}: no 'items' object")
        for item_id, entry in doc["items"].items():
            if not isinstance(entry, dict) or entry.get("status") not in STATUSES:
                raise StateCorrupt(f"{path}: item {item_id!r} has no valid status")
        state.items = doc["items"]
        last = doc.get("last_pass")
        state.last_pass = last if isinstance(last, dict) else None
        meta = doc.get("meta")
        state.meta = meta if isinstance(meta, dict) else {}
        return state

    @classmethod
    def open(cls, path: Path) -> State:
        """Load, or set a corrupt file aside (never overwrite it) and start empty."""
        try:
            return cls.read(path)
        except StateCorrupt as exc:
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            path.replace(aside)
            log.error(
                "state file corrupt: set aside, rebuilding from the files on disk",
                error=str(exc),
                kept_as=str(aside),
            )
            state = cls(path)
            state.recovered_from = aside
            return state

    # -- updating ----------------------------------------------------------------

    def get(self, item_id: str) -> Mapping[str, Any] | None:
        """The entry for ``item_id``, if any."""
        return self.items.get(item_id)

    def put(self, item_id: str, **fields: Any) -> Mapping[str, Any]:
        """Replace the entry of ``item_id`` by the old one updated with ``fields``."""
        old = self.items.get(item_id, {})
        entry = {**old, **fields, "updated_at": round(time.time(), 3)}
        self.items[item_id] = entry
        self.dirty += 1
        return entry

    def drop(self, item_id: str) -> None:
        """Forget an item."""
        if self.items.pop(item_id, None) is not None:
            self.dirty += 1

    def counts(self) -> dict[str, int]:
        """How many items are in each status."""
        c = Counter(e.get("status") for e in self.items.values())
        return {s: c.get(s, 0) for s in STATUSES}

    # -- writing -----------------------------------------------------------------

    def _document(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "items": dict(self.items),
            "last_pass": self.last_pass,
            "meta": dict(self.meta),
        }

    async def save(self) -> None:
        """Write the checkpoint atomically; the encoding happens off the event loop."""
        async with self._save_lock:
            doc = self._document()
            self.dirty = 0
            t0 = time.perf_counter()
            try:
                await asyncio.to_thread(self._write, doc)
            except BaseException:
                self.dirty += 1
                raise
            self.last_save_seconds = time.perf_counter() - t0

    def save_sync(self) -> None:
        """Write the checkpoint from synchronous code (commands that do not loop)."""
        self._write(self._document())
        self.dirty = 0

    def _write(self, doc: dict[str, Any]) -> None:
        data = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        write_bytes_atomic(self.path, data, mode=0o600)


def read_json_or_none(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_bytes())
    return None
