"""ERP records: one object per catalogue item, with ``image_path`` as the ERP stores it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .state import State
from .storage import write_bytes_atomic


def erp_records(state: State, images_dir: Path) -> list[dict[str, Any]]:
    """The records of CONTRACT.md, sorted by item id for stable output."""
    root = images_dir.parent.parent
    out = []
    for item_id in sorted(state.items):
        e = state.items[item_id]
        path = e.get("path")
        rel: str | None = None
        if e.get("status") == "downloaded" and path and os.path.exists(path):
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


def write_export(records: list[dict[str, Any]], out: Path) -> None:
    """Write the records atomically (temp, fsync, rename)."""
    data = json.dumps(records, ensure_ascii=False, indent=1).encode("utf-8")
    write_bytes_atomic(out, data + b"\n", mode=0o644)
