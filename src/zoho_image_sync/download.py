"""The consumers: fetch one item's image, verify it, and commit it atomically."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from .errors import ItemError, StorageError
from .logsetup import debug_enabled
from .metrics import Metrics
from .pager import CatalogueItem
from .storage import Committed, ImageSink, Writer, sha256_file
from .zoho import ZohoClient

log = structlog.get_logger(__name__)

# Errors every other write would hit too. ENOENT: the images folder itself is gone (a
# file's own absence is never an error on the write path).
DISK_WIDE = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.EFBIG,
        errno.ENOENT,
    }
)


@dataclass(frozen=True, slots=True)
class Job:
    """One image to fetch: the item, where from, and what we held before."""

    item: CatalogueItem
    url: str
    identity: str
    previous: Mapping[str, Any] | None
    base: Mapping[str, Any]  # image_fields(item, identity, url), built once per job
    verify_only: bool = False
    on_disk: tuple[str, ...] = ()  # this item's extensions found at pass start


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to a job."""

    kind: str  # "new" | "updated" | "unchanged" | "error"
    fields: dict[str, Any]
    reason: str | None = None
    detail: str | None = None


def image_fields(item: CatalogueItem, identity: str, url: str) -> dict[str, Any]:
    """The catalogue facts kept in the state for every item (export needs them)."""
    return {
        "name": item.name,
        "sku": item.sku,
        "image_name": item.image_name,
        "image_type": item.image_type,
        "image_document_id": item.image_document_id or None,
        "image_url": url if item.from_url_map or item.image_url else None,
        "identity": identity,
    }


def verified_stat(previous: Mapping[str, Any]) -> os.stat_result | None:
    """The recorded file's stat if it exists with the recorded sha256 (blocking; hashes it)."""
    path = previous.get("path")
    if not path:
        return None
    try:
        digest, st = sha256_file(path)
    except OSError:
        return None
    return st if digest == previous.get("sha256") else None


@dataclass(slots=True)
class Handoff:
    """A fetched image whose body is with the image writer (``run_job`` with a writer).

    The worker is free for its next item; call ``finish()`` once ``future`` is done.
    """

    future: asyncio.Future[Committed]
    finish: Callable[[], Outcome]


async def run_job(
    job: Job,
    client: ZohoClient,
    images_dir: Path,
    metrics: Metrics,
    writer: Writer | None = None,
) -> Outcome | Handoff:
    """Download (or verify) one image; never raises for a per-item failure.

    With a ``writer``, an image held in memory is handed to the writer and a
    ``Handoff`` comes back as soon as the body is in: the caller overlaps the next download
    with this write (the write was ~0.8 ms of every 52 ms round on a 50 ms link).
    """
    item = job.item
    base = job.base
    prev = job.previous
    if job.verify_only and prev is not None:
        st = await asyncio.to_thread(verified_stat, prev)
        if st is not None:
            return Outcome(
                "unchanged", {**base, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
            )
    sink = ImageSink(images_dir, item.item_id)
    t0 = time.perf_counter()
    try:
        try:
            result = await client.fetch_image(job.url, sink)
            stale = [e for e in job.on_disk if e != result.ext]
            if writer is not None and sink.in_memory:
                path, future = sink.hand_over(writer, result.ext, stale)

                def finish() -> Outcome:
                    try:
                        sink.committed(future.result())
                    except OSError as exc:
                        return _write_failed(exc, job, base, images_dir, metrics)
                    return _written(job, base, sink, path, result.ext, metrics, t0)

                return Handoff(future, finish)
            path = await sink.commit(result.ext, stale)
        except OSError as exc:
            await sink.discard()
            return _write_failed(exc, job, base, images_dir, metrics)
    except ItemError as exc:
        await sink.discard()
        return _item_failed(exc, job, base, metrics)
    except BaseException:
        await sink.discard()
        raise
    return _written(job, base, sink, path, result.ext, metrics, t0)


def _item_failed(exc: ItemError, job: Job, base: Mapping[str, Any], metrics: Metrics) -> Outcome:
    metrics.image_failures.labels(exc.reason).inc()
    log.warning("image failed", item_id=job.item.item_id, reason=exc.reason, detail=exc.detail)
    return Outcome("error", dict(base), reason=exc.reason, detail=exc.detail)


def disk_failure(exc: OSError, images_dir: Path) -> StorageError | ItemError:
    """What an OSError on the images folder (a write or a removal) means: the folder
    refusing every write (stop the pass, do not mark every item failed), or this item's."""
    detail = f"{exc.strerror or exc} ({images_dir})"
    if exc.errno in DISK_WIDE:
        return StorageError(f"images folder refuses writes: {detail}")
    return ItemError("write_failed", detail)


def _write_failed(
    exc: OSError, job: Job, base: Mapping[str, Any], images_dir: Path, metrics: Metrics
) -> Outcome:
    # The client maps every network error (aiohttp's are OSErrors too) into our tree, so an
    # OSError here comes from the disk: the spill file or the commit.
    failure = disk_failure(exc, images_dir)
    if isinstance(failure, StorageError):
        metrics.image_failures.labels("write_failed").inc()
        raise failure from None
    return _item_failed(failure, job, base, metrics)


def _written(
    job: Job,
    base: Mapping[str, Any],
    sink: ImageSink,
    path: str,
    ext: str,
    metrics: Metrics,
    t0: float,
) -> Outcome:
    metrics.image_written(time.perf_counter() - t0, sink.size)
    assert sink.mtime_ns is not None and sink.ctime_ns is not None
    had_image = job.previous is not None and job.previous.get("path")
    fields = {
        **base,
        "status": "downloaded",
        "path": path,
        "ext": ext,
        "sha256": sink.sha256(),
        "bytes": sink.size,
        "mtime_ns": sink.mtime_ns,
        "ctime_ns": sink.ctime_ns,
        "rebuilt": None,  # ours now, whatever the state said after a loss
        "reason": None,
        "detail": None,
    }
    if debug_enabled():
        log.debug("image written", item_id=job.item.item_id, bytes=sink.size, ext=ext)
    return Outcome("updated" if had_image else "new", fields)
