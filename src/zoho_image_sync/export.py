"""ERP records: one object per catalogue item, with ``image_path`` as the ERP stores it."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from .state import State
from .storage import write_bytes_atomic


def erp_records(state: State, images_dir: Path) -> list[dict[str, Any]]:
    """The records of CONTRACT.md, sorted by item id for stable output."""
    root = images_dir.parent.parent
    folder = str(images_dir)
    try:
        present = set(os.listdir(folder))  # one folder read, not a stat per image
    except FileNotFoundError:
        present = set()

    def on_disk(path: str) -> bool:
        where, name = os.path.split(path)
        return name in present if where == folder else os.path.exists(path)

    out = []
    for item_id in sorted(state.items):
        e = state.items[item_id]
        path = e.get("path")
        rel: str | None = None
        if e.get("status") == "downloaded" and path and on_disk(path):
            rel = Path(os.path.relpath(path, root)).as_posix()
        out.append(
            {
                "zoho_item_id": item_id,
                "name": e.get("name") or "",
                "sku": e.get("sku") or "",
                "image_name": e.get("image_name") or None,
                "image_document_id": e.get("image_document_id") or None,
                "image_url": e.get("image_url") or None,
                "image_path": rel,
                "image_sha256": e.get("sha256") if rel else None,
                "image_bytes": e.get("bytes") if rel else None,
                "image_status": e.get("status"),
            }
        )
    return out


FIELDS = (
    "zoho_item_id",
    "name",
    "sku",
    "image_name",
    "image_document_id",
    "image_url",
    "image_path",
    "image_sha256",
    "image_bytes",
    "image_status",
)
IMAGE_FIELDS = FIELDS[3:]


def render(records: list[dict[str, Any]], fmt: str) -> bytes:
    """The records as JSON (an array) or CSV (a header line, then one row each)."""
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
        w.writeheader()
        for r in records:
            w.writerow({k: "" if r[k] is None else r[k] for k in FIELDS})
        return buf.getvalue().encode("utf-8")
    return json.dumps(records, ensure_ascii=False, indent=1).encode("utf-8") + b"\n"


def write_export(records: list[dict[str, Any]], out: Path, fmt: str = "json") -> None:
    """Write the records atomically (temp, fsync, rename)."""
    write_bytes_atomic(out, render(records, fmt), mode=0o644, only_over_files=True)


class MergeError(ValueError):
    """The ERP records file cannot be merged (not an array of objects with ids)."""


def merge(existing: Any, records: list[dict[str, Any]]) -> tuple[list[Any], int, int]:
    """Set (or clear) the image fields of each ERP record; everything else untouched.

    Returns (merged records, how many matched an item, how many had no item in the state).
    Records keep their order and every other field; an item the state does not know keeps
    its record exactly as it was.
    """
    if not isinstance(existing, list):
        raise MergeError("the ERP records file must hold a JSON array")
    by_id = {r["zoho_item_id"]: r for r in records}
    out: list[Any] = []
    matched = unknown = 0
    for index, rec in enumerate(existing):
        if not isinstance(rec, dict):
            raise MergeError(f"record {index} is not an object")
        item_id = rec.get("zoho_item_id")
        if item_id is None:
            raise MergeError(f"record {index} has no zoho_item_id")
        ours = by_id.get(str(item_id))
        if ours is None:
            unknown += 1
            out.append(rec)
            continue
        matched += 1
        merged = dict(rec)
        for key in IMAGE_FIELDS:
            if key in rec or ours[key] is not None:
                merged[key] = ours[key]
        out.append(merged)
    return out, matched, unknown
