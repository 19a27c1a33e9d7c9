"""The JSON checkpoint: what we hold for every item, written atomically (mode 0600).

Entries are treated as immutable: an update replaces the item's dict, so a save
only needs a shallow copy of ``items`` on the event loop and encodes it in a thread.

Between saves every change is appended to a journal (``state.json.journal``, one JSON
line per change; on the event loop the lines of one loop turn go out in one O_APPEND
write at the end of the turn) so a crash loses at most the downloads in flight, not the
last few seconds of work. A save rotates the journal to ``.journal.1``
before snapshotting and deletes it once the snapshot is on disk; loading replays
``.journal.1`` then ``.journal`` over the snapshot (replays are idempotent), ignoring a
torn last line.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import orjson
import structlog

from .storage import (
    EXTENSIONS,
    image_path,
    sha256_file,
    split_image_name,
    valid_item_id,
    write_bytes_atomic,
)

STATE_VERSION: Final = 1
STATUSES: Final = ("downloaded", "no_image", "failed", "pending")

log = structlog.get_logger(__name__)

# What a downloaded entry says about its file; an entry whose file facts cannot be
# trusted loses them and becomes pending: its image is fetched again.
FILE_FIELDS: Final = ("path", "ext", "sha256", "bytes", "mtime_ns", "ctime_ns")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _file_facts_ok(item_id: str, entry: Mapping[str, Any], images_dir: str | None) -> bool:
    path, ext = entry.get("path"), entry.get("ext")
    if not (isinstance(path, str) and isinstance(ext, str) and ext in EXTENSIONS):
        return False
    if not isinstance(entry.get("sha256"), str):
        return False
    if not all(_is_int(entry.get(key, 0)) for key in ("bytes", "mtime_ns", "ctime_ns")):
        return False
    # Our files are named by the item and live in the images folder: a path anywhere else
    # (edited by hand, or the folder moved in the config) is never read, kept or exported.
    return images_dir is None or path == image_path(images_dir, item_id, ext)


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
        self._journal_fd: int | None = None
        self._pending: list[bytes] = []  # journal lines of this loop turn (see _append)
        self._torn = False
        self.journaling = False
        # Called on the loop before each save: it may update ``meta`` and return side files
        # ({path: bytes}) to write atomically in the same thread hop as the snapshot.
        self.before_save: Callable[[], dict[Path, bytes]] = dict

    @property
    def journal_path(self) -> Path:
        """Changes since the last snapshot."""
        return self.path.with_name(self.path.name + ".journal")

    @property
    def _rotated_path(self) -> Path:
        return self.path.with_name(self.path.name + ".journal.1")

    def _append(self, record: dict[str, Any]) -> None:
        if not self.journaling:
            return
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        if self._pending:
            self._pending.append(line)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # synchronous commands: write it now
            self._write_journal(line)
            return
        # On the loop, the lines of one loop turn (a writer batch's worth of images) go
        # out in one write at the end of the turn, not one syscall per image.
        self._pending.append(line)
        loop.call_soon(self.flush_journal, context=contextvars.Context())

    def flush_journal(self) -> None:
        """Write the journal lines buffered in this loop turn."""
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        if self._torn:
            # The last write failed part-way: start on a fresh line, so the torn one is
            # skipped on replay and does not swallow the first line of this write.
            lines.insert(0, b"\n")
        try:
            self._write_journal(b"".join(lines))
        except OSError as exc:
            # The entries are in memory and the next save writes them; only the crash net
            # for the time until then is gone.
            self._torn = True
            log.warning("could not append to the state journal", error=str(exc))
        else:
            self._torn = False

    def _write_journal(self, data: bytes) -> None:
        if self._journal_fd is None:
            self._journal_fd = os.open(
                self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
            )
        view = memoryview(data)
        while view:
            view = view[os.write(self._journal_fd, view) :]

    def _rotate(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            if self._rotated_path.exists():
                # An earlier save failed after rotating: keep both generations in order.
                with self._rotated_path.open("ab") as old:
                    old.write(self.journal_path.read_bytes())
                self.journal_path.unlink()
            else:
                self.journal_path.replace(self._rotated_path)

    def close(self) -> None:
        """Write what is buffered and close the journal file."""
        self.flush_journal()
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None

    def _replay(self) -> int:
        replayed = 0
        for path in (self._rotated_path, self.journal_path):
            try:
                lines = path.read_bytes().splitlines()
            except FileNotFoundError:
                continue
            for raw in lines:
                try:
                    rec = orjson.loads(raw)
                    item_id = rec["id"]
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from a crash mid-write
                if not isinstance(item_id, str):
                    continue  # not a line we wrote
                entry = rec.get("entry")
                if entry is None:
                    self.items.pop(item_id, None)
                elif isinstance(entry, dict) and entry.get("status") in STATUSES:
                    self.items[item_id] = entry
                replayed += 1
        if replayed:
            self.dirty += replayed
        return replayed

    # -- reading -----------------------------------------------------------------

    @classmethod
    def read(cls, path: Path, images_dir: Path | None = None) -> State:
        """Load the checkpoint; a missing file is an empty state, a bad one raises.

        Entries that cannot be ours are set right (see ``_sanitise``); ``images_dir``
        also sets right downloaded entries whose file is not in it.
        """
        state = cls._read(path)
        state._sanitise(None if images_dir is None else str(images_dir))
        return state

    def _sanitise(self, images_dir: str | None) -> None:
        self._sanitise_bookkeeping()
        items = self.items
        # An id that is not an item id is never used as a file name (it could point
        # anywhere): forgotten.
        dropped = [item_id for item_id in items if not valid_item_id(item_id)]
        for item_id in dropped:
            del items[item_id]
        demoted = [
            item_id
            for item_id, entry in items.items()
            if entry.get("status") == "downloaded"
            and not _file_facts_ok(item_id, entry, images_dir)
        ]
        for item_id in demoted:
            kept = {k: v for k, v in items[item_id].items() if k not in FILE_FIELDS}
            items[item_id] = {**kept, "status": "pending"}
        if dropped or demoted:
            self.dirty += 1
            log.warning(
                "state entries set right: ids that are not item ids forgotten; downloaded "
                "entries with unusable file facts will be fetched again",
                forgotten=len(dropped),
                refetch=len(demoted),
                examples=[i[:80] for i in (dropped + demoted)[:5]],
            )

    def _sanitise_bookkeeping(self) -> None:
        """``meta`` and ``last_pass`` of the wrong shape (edited by hand) are dropped, each
        value on its own: the budget spent today, the incremental bookkeeping, the last
        report. Dropping one costs a full scan or a zero count, never a crash at start."""
        meta = self.meta
        shapes: dict[str, Callable[[Any], bool]] = {
            "budget": lambda b: (
                isinstance(b, dict)
                and _is_int(b.get("spent", 0))
                and isinstance(b.get("day", ""), str)
            ),
            "passes_since_full": _is_int,
            "last_full_pages": _is_int,
            "last_complete_pass_started_at": _is_number,
        }
        wrong = [key for key, ok in shapes.items() if key in meta and not ok(meta[key])]
        for key in wrong:
            del meta[key]
        last = self.last_pass
        if last is not None and not (
            isinstance(last.get("statistics"), dict)
            and isinstance(last.get("status"), str)
            and (last.get("finished_at") is None or _is_number(last.get("finished_at")))
        ):
            self.last_pass = None
            wrong.append("last_pass")
        if wrong:
            self.dirty += 1
            log.warning("state bookkeeping of the wrong shape dropped", keys=wrong)

    @classmethod
    def _read(cls, path: Path) -> State:
        state = cls(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            state._replay()
            return state
        try:
            # The standard parser peaks ~20 MB lower than orjson on a 100,000-item state,
            # and a load happens once per process; orjson pays on the frequent saves.
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StateCorrupt(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("items"), dict):
            raise StateCorrupt(f"{path}: no 'items' object")
        for item_id, entry in doc["items"].items():
            if not isinstance(entry, dict) or entry.get("status") not in STATUSES:
                raise StateCorrupt(f"{path}: item {item_id!r} has no valid status")
        for entry in doc["items"].values():
            # 100,000 copies of "no_image" are 100,000 strings unless interned.
            entry["status"] = sys.intern(entry["status"])
        state.items = doc["items"]
        last = doc.get("last_pass")
        state.last_pass = last if isinstance(last, dict) else None
        meta = doc.get("meta")
        state.meta = meta if isinstance(meta, dict) else {}
        state._replay()
        return state

    @classmethod
    def open(cls, path: Path, images_dir: Path | None = None) -> State:
        """Load, or set a corrupt file aside (never overwrite it) and start empty."""
        try:
            return cls.read(path, images_dir)
        except StateCorrupt as exc:
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            path.replace(aside)
            log.error(
                "state file corrupt: set aside, rebuilding from the files on disk",
                error=str(exc),
                kept_as=str(aside),
            )
            state = cls(path)
            for journal in (state._rotated_path, state.journal_path):
                with contextlib.suppress(FileNotFoundError):
                    journal.replace(journal.with_name(f"{journal.name}.{aside.name}"))
            state.recovered_from = aside
            return state

    # -- updating ----------------------------------------------------------------

    def get(self, item_id: str) -> Mapping[str, Any] | None:
        """The entry for ``item_id``, if any."""
        return self.items.get(item_id)

    def put(self, item_id: str, *, journal: bool = True, **fields: Any) -> Mapping[str, Any]:
        """Replace the entry of ``item_id`` by the old one updated with ``fields``."""
        old = self.items.get(item_id, {})
        # None and "" mean "not set": dropping those keys keeps 100,000 entries small
        # in memory (most items have no image, so most image fields are empty).
        entry = {k: v for k, v in {**old, **fields}.items() if v is not None and v != ""}
        entry["updated_at"] = round(time.time(), 3)
        self.items[item_id] = entry
        self.dirty += 1
        if journal:
            self._append({"id": item_id, "entry": entry})
        return entry

    def drop(self, item_id: str) -> None:
        """Forget an item."""
        if self.items.pop(item_id, None) is not None:
            self.dirty += 1
            self._append({"id": item_id, "entry": None})

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
            side = self.before_save()
            doc = self._document()
            self._rotate()
            self.dirty = 0
            try:
                await asyncio.to_thread(self._write, doc, side)
            except BaseException:
                self.dirty += 1
                raise
            with contextlib.suppress(FileNotFoundError):
                self._rotated_path.unlink()

    def save_sync(self) -> None:
        """Write the checkpoint from synchronous code (commands that do not loop)."""
        doc = self._document()
        self._rotate()
        self._write(doc)
        with contextlib.suppress(FileNotFoundError):
            self._rotated_path.unlink()
        self.dirty = 0

    def _write(self, doc: dict[str, Any], side: dict[Path, bytes] | None = None) -> None:
        # orjson: 100,000 items encode in a fraction of json's time, straight to bytes
        # (no second 20 MB copy for the str -> bytes step).
        data = orjson.dumps(doc)
        write_bytes_atomic(self.path, data, mode=0o600)
        for path, content in (side or {}).items():
            try:
                write_bytes_atomic(path, content, mode=0o600)
            except OSError as exc:  # a side file is a hint; the state itself is saved
                log.warning("could not save a side file", path=str(path), error=str(exc))


def rebuild_from_disk(state: State, images_dir: Path) -> int:
    """Adopt the images found on disk after the state was lost (blocking; hashes each file).

    Their identity is unknown, so the next pass fetches them again and replaces each file
    atomically: nothing is lost meanwhile, and the ERP keeps reading the old bytes.
    """
    adopted = 0
    for path in sorted(images_dir.iterdir()):
        parsed = split_image_name(path.name)
        if parsed is None or not valid_item_id(parsed[0]):
            continue
        item_id, ext = parsed
        if not path.is_file():  # before opening it: a FIFO named 1.jpg would block the read
            continue
        digest, st = sha256_file(path)
        state.put(
            item_id,
            status="downloaded",
            path=str(path),
            ext=ext,
            sha256=digest,
            bytes=st.st_size,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
            identity=None,
            rebuilt=True,
        )
        adopted += 1
    return adopted


def read_json_or_none(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_bytes())
    return None
