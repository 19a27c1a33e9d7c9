"""One sync pass: the pager feeds a bounded queue, a resizable pool of workers drains it.

Stopping is two-phase: the producer stops first and queued items are dropped, then
in-flight downloads get ``shutdown_timeout`` to finish before they are cancelled (their
temporaries removed). State is saved periodically and at the end, whatever the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from .download import Handoff, Job, Outcome, disk_failure, image_fields, run_job
from .errors import (
    BudgetExhausted,
    ConfigError,
    FatalPassError,
    StorageError,
    SyncError,
    TokenUnavailable,
)
from .metrics import Metrics
from .pager import CatalogueItem, Pages
from .state import State
from .storage import (
    new_image_writer,
    remove_item_images,
    split_image_name,
    valid_item_id,
)
from .zoho import ZohoClient

log = structlog.get_logger(__name__)

SAVE_EVERY_SECONDS = 2.0

PageSource = Callable[[], Pages]


@dataclass
class PassStats:
    """The counts of the pass report (CONTRACT.md)."""

    total: int = 0
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    no_image: int = 0
    images_downloaded: int = 0
    bytes_downloaded: int = 0
    errors: int = 0
    removed: int = 0
    api_requests: int = 0
    errors_list: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        """The ``statistics`` object."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "errors_list"
        }


@dataclass
class Progress:
    """The live progress of a pass, for /state, STATUS= and the terminal."""

    started_at: float = field(default_factory=time.time)
    pages_done: int = 0
    items_seen: int = 0
    queued: int = 0
    images_done: int = 0
    in_flight: int = 0
    catalogue_done: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON view with rate and ETA."""
        elapsed = max(time.time() - self.started_at, 1e-6)
        rate = self.images_done / elapsed
        left = max(self.queued - self.images_done, 0)
        return {
            "started_at": round(self.started_at, 3),
            "elapsed_seconds": round(elapsed, 1),
            "pages_done": self.pages_done,
            "items_seen": self.items_seen,
            "images_queued": self.queued,
            "images_done": self.images_done,
            "in_flight": self.in_flight,
            "images_per_second": round(rate, 2),
            "eta_seconds": round(left / rate, 1) if rate > 0 and self.catalogue_done else None,
            "catalogue_done": self.catalogue_done,
        }


class SyncPass:
    """One pass over the catalogue."""

    def __init__(
        self,
        *,
        pages: PageSource,
        client: ZohoClient,
        state: State,
        metrics: Metrics,
        images_dir: Path,
        url_map: dict[str, str],
        workers: int,
        shutdown_timeout: float,
        stop: asyncio.Event | None = None,
        full_scan: bool = True,
        finishing: Callable[[SyncPass, dict[str, Any]], None] | None = None,
    ) -> None:
        self.pages = pages
        self.finishing = finishing
        self.full_scan = full_scan
        self.client = client
        self.state = state
        self.metrics = metrics
        self.images_dir = images_dir
        self.url_map = url_map
        self.target_workers = workers
        self.shutdown_timeout = shutdown_timeout
        self.external_stop = stop or asyncio.Event()
        self.stats = PassStats()
        self.progress = Progress()
        self.interrupted: str | None = None
        self.fatal: SyncError | None = None
        self._stop = asyncio.Event()
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=max(2 * workers, 16))
        self._seen: set[str] = set()
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._complete = False
        self._closing = False
        self._deadline: float | None = None  # monotonic; set when a stop starts the drain clock
        self._reported = False  # the report is being built: late writes touch only the state
        self._on_disk: dict[str, tuple[str, ...]] = {}
        self._writer = new_image_writer()

    @property
    def complete(self) -> bool:
        """The whole catalogue was read and the pass neither failed nor stopped."""
        return self._complete and self.fatal is None and self.interrupted is None

    # -- control -----------------------------------------------------------

    def resize(self, workers: int) -> None:
        """Grow or shrink the worker pool live; a shrinking worker ends after its item."""
        self.target_workers = workers
        if self._tg is not None and not self._closing:
            for i in range(workers):
                if i not in self._workers or self._workers[i].done():
                    self._workers[i] = self._tg.create_task(self._worker(i), name=f"worker-{i}")
        self.metrics.workers.set(workers)

    def _halt(self, reason: str | None = None, fatal: SyncError | None = None) -> None:
        if fatal is not None and self.fatal is None and self.interrupted is None:
            # A stop asked for first stays a stop: what fails after it is its consequence.
            self.fatal = fatal
        if reason is not None and self.interrupted is None and self.fatal is None:
            self.interrupted = reason
        self._stop.set()

    # -- the pass ----------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Run to completion (or stop) and return the pass report."""
        t0 = time.monotonic()
        requests_before = self.client.requests_sent
        self.metrics.pass_in_progress.set(1)
        self._on_disk = await asyncio.to_thread(_scan_images, self.images_dir)
        self._writer.start()
        self.metrics.queue_length = self._queue.qsize
        self.metrics.in_flight = lambda: self.progress.in_flight
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self.resize(self.target_workers)
                watcher = tg.create_task(self._watch_external_stop(), name="stop-watch")
                saver = tg.create_task(self._saver(), name="state-saver")
                producer = tg.create_task(self._produce(), name="pager")
                stopped = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait({producer, stopped}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if not producer.done():
                    # A page request may be waiting out a long 429 or a slow server: pages
                    # hold no state, so a stop does not wait for it.
                    producer.cancel()
                await self._drain()
                self._closing = True
                for task in (watcher, saver, producer, *self._workers.values()):
                    task.cancel()
        finally:
            self._tg = None
            # A stop gives the writes the rest of the drain deadline, not more (a stuck disk
            # must not hold a SIGTERM past TimeoutStopSec); otherwise every write finishes.
            deadline = self._deadline
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not await self._writer.aclose(left):
                log.warning("writes still pending at the deadline; they finish in the background")
            self._reported = True
            self.metrics.pass_in_progress.set(0)
            self.metrics.queue_length = self.metrics.in_flight = int
        self.stats.api_requests = self.client.requests_sent - requests_before
        if self.complete and self.full_scan:
            self._forget_unlisted()
        # Not needed any more, and at 100,000 items worth ~10 MB at the final save's peak.
        self._seen = set()
        self._on_disk = {}
        report = self._report()
        if self.finishing is not None:
            try:  # the caller's bookkeeping, in the same final save, which must happen anyway
                self.finishing(self, report)
            except Exception:
                log.exception("pass bookkeeping failed; saving the state without it")
        self.state.last_pass = report
        await self.state.save()
        self.metrics.pass_duration.observe(time.monotonic() - t0)
        self.metrics.passes.labels(report["status"]).inc()
        if report["status"] in ("success", "partial"):
            self.metrics.last_pass_success.set(time.time())
            self.metrics.last_pass_images.set(self.stats.images_downloaded)
        return report

    async def _watch_external_stop(self) -> None:
        await self.external_stop.wait()
        self._halt("signal")

    async def _saver(self) -> None:
        while True:
            await asyncio.sleep(SAVE_EVERY_SECONDS)
            if self.state.dirty:
                await self.state.save()

    async def _drain(self) -> None:
        """Wait for queued and in-flight work; on a stop, give in-flight a deadline."""
        join = asyncio.ensure_future(self._queue.join())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({join, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not join.done():
                # Stopping: workers drop queued jobs and finish the one in hand.
                self._deadline = time.monotonic() + self.shutdown_timeout
                done, _ = await asyncio.wait({join}, timeout=self.shutdown_timeout)
                if not done:
                    busy = sum(1 for t in self._workers.values() if not t.done())
                    log.warning(
                        "drain deadline passed; cancelling in-flight downloads",
                        in_flight=self.progress.in_flight,
                        workers=busy,
                    )
        finally:
            join.cancel()
            stop.cancel()

    async def _produce(self) -> None:
        try:
            async for page, items in self.pages():
                for item in items:
                    if self._stop.is_set():
                        return
                    await self._plan(item)
                self.progress.pages_done = page
                self.metrics.pass_progress.set(self.progress.items_seen)
            if not self.full_scan:
                await self._retry_unlisted()
            self._complete = not self._stop.is_set()
            self.progress.catalogue_done = True
        except Exception as exc:
            # A bug must fail the pass (and be retried later), not crash the daemon.
            self._halt_for(exc)

    async def _put(self, job: Job) -> None:
        self.progress.queued += 1
        if job.previous is None or job.previous.get("status") != "downloaded":
            # Not journaled: after a crash an item is pending or unknown alike (fetched again).
            self.state.put(job.item.item_id, **job.base, status="pending", journal=False)
        # Back-pressure: wait for room. A stop cancels the pager (this task), so a put
        # waiting here needs no race against the stop event of its own.
        await self._queue.put(job)

    def _error(self, item_id: str, reason: str, detail: str) -> None:
        self.stats.errors += 1
        self.stats.errors_list.append({"zoho_item_id": item_id, "reason": reason, "detail": detail})

    async def _plan(self, item: CatalogueItem) -> None:
        """Decide what one catalogue item needs: nothing, a removal, or a download."""
        item_id = item.item_id
        self.progress.items_seen += 1
        if not valid_item_id(item_id):
            # Before the duplicate check: every bad entry counts and is reported, even
            # several without an id; the entry's position tells the ERP team which.
            self.stats.total += 1
            shown = item_id[:80].encode("unicode_escape").decode()
            where = f"catalogue entry {self.progress.items_seen}"
            self._error(shown, "bad_item_id", f"id must match ^[A-Za-z0-9_-]{{1,64}}$ ({where})")
            self.metrics.image_failures.labels("bad_item_id").inc()
            return
        if item_id in self._seen:
            log.warning("item listed twice in one pass; ignored", item_id=item_id)
            return
        self._seen.add(item_id)
        self.stats.total += 1
        prev = self.state.get(item_id)  # entries are replaced on put, never changed: no copy
        if prev is not None and prev.get("missing"):
            prev = self.state.put(item_id, missing=None)
        url = self.url_map.get(item_id) or item.image_url
        if item_id in self.url_map:
            item = _with_map(item)
        if not url and item.has_zoho_image:
            url = self.client.image_url(item_id)  # built here: no need to parse it
        elif not url:
            await self._no_image(item, prev)
            return
        elif not _fetchable(url):
            self._error(item_id, "bad_url", f"only http and https URLs are fetched: {url[:200]}")
            self.metrics.image_failures.labels("bad_url").inc()
            self.state.put(
                item_id,
                **image_fields(item, "", url),
                status="failed",
                reason="bad_url",
                detail=url[:200],
            )
            return
        identity = image_identity(item, url)
        same = (
            prev is not None
            and prev.get("status") == "downloaded"
            and prev.get("identity") == identity
        )
        if same and prev is not None and _stat_matches(prev):
            self.stats.unchanged += 1
            self._refresh_facts(item, prev, identity, url)
            return
        # The same image with another size, mtime or ctime (or no file): the job hashes
        # the file and downloads again only if the bytes differ or it is gone.
        on_disk = self._on_disk.get(item_id, ())
        base = image_fields(item, identity, url)
        await self._put(Job(item, url, identity, prev, base, verify_only=same, on_disk=on_disk))

    async def _retry_unlisted(self) -> None:
        """Incremental passes list only modified items: retry our failed and pending ones
        too, and check the files of the downloaded ones, as a full pass does: a file gone
        or changed since it was written is put right now, not at the next full scan."""
        unlisted = [(i, e) for i, e in self.state.items.items() if i not in self._seen]
        downloaded = [(i, e) for i, e in unlisted if e.get("status") == "downloaded"]
        # One stat per image (25 ms per 10,000 on ext4, cached), off the loop.
        changed = await asyncio.to_thread(_changed_files, downloaded)
        again = [
            (item_id, e)
            for item_id, e in unlisted
            if item_id in changed or e.get("status") in ("failed", "pending")
        ]
        for item_id, e in again:
            if self._stop.is_set():
                return
            # A url_map entry wins over image_url in _plan, whatever is passed here.
            await self._plan(
                CatalogueItem(
                    item_id=item_id,
                    name=e.get("name") or "",
                    sku=e.get("sku") or "",
                    image_name=e.get("image_name") or "",
                    image_type=e.get("image_type") or "",
                    image_document_id=e.get("image_document_id") or "",
                    image_url=e.get("image_url") or "",
                )
            )

    def _refresh_facts(
        self, item: CatalogueItem, prev: Mapping[str, Any], identity: str, url: str
    ) -> None:
        facts = image_fields(item, identity, url)
        # The state drops empty values: "" and None both read back as missing.
        if any((prev.get(k) or None) != (v or None) for k, v in facts.items()):
            self.state.put(item.item_id, **facts)

    async def _no_image(self, item: CatalogueItem, prev: Mapping[str, Any] | None) -> None:
        self.stats.no_image += 1
        exts = self._on_disk.get(item.item_id, ())
        if prev is not None and prev.get("path") and exts:
            try:
                removed = await asyncio.to_thread(
                    remove_item_images, self.images_dir, item.item_id, None, exts
                )
            except OSError as exc:
                # The entry stays as it was: the next pass tries the removal again.
                self.metrics.image_failures.labels("write_failed").inc()
                failure = disk_failure(exc, self.images_dir)
                if isinstance(failure, StorageError):
                    self._halt_for(failure, item.item_id)
                else:
                    self._error(item.item_id, failure.reason, failure.detail)
                return
            if removed:
                self.stats.removed += 1
                log.info("image gone from Zoho; local file removed", item_id=item.item_id)
        if prev is None or prev.get("status") != "no_image" or prev.get("path"):
            self.state.put(
                item.item_id,
                **image_fields(item, "", ""),
                status="no_image",
                path=None,
                sha256=None,
                bytes=None,
                ext=None,
                reason=None,
                detail=None,
            )
        else:
            self._refresh_facts(item, prev, "", "")

    async def _worker(self, index: int) -> None:
        previous: asyncio.Future[Any] | None = None  # this worker's last hand-off
        while index < self.target_workers:
            job = await self._queue.get()
            handed = False
            try:
                if self._stop.is_set():
                    continue
                self.progress.in_flight += 1
                try:
                    # Every log line about this item (retries, 429s) carries its id. Bound
                    # in this worker task's own context until its next item: cheaper than
                    # a bind and unbind per image, and nothing else logs from this task.
                    structlog.contextvars.bind_contextvars(item_id=job.item.item_id)
                    outcome = await run_job(
                        job, self.client, self.images_dir, self.metrics, self._writer
                    )
                    if isinstance(outcome, Handoff):
                        # The writer has the body; this worker goes on to the next item and
                        # the item is recorded (and task_done) once its write is durable.
                        handed = True
                        outcome.future.add_done_callback(
                            functools.partial(self._finish, job, outcome)
                        )
                        if previous is not None and not previous.done():
                            # At most two images per worker with the writer: memory stays
                            # bounded when the disk is slower than the network.
                            await _settled(previous)
                        previous = outcome.future
                        continue
                finally:
                    if not handed:
                        self.progress.in_flight -= 1
                self._record(job, outcome)
            except Exception as exc:
                self._halt_for(exc, job.item.item_id)
            finally:
                if not handed:
                    self._queue.task_done()

    def _finish(self, job: Job, handoff: Handoff, _: object) -> None:
        """A handed-over image's write is done (or failed): record it."""
        try:
            outcome = handoff.finish()
            if self._reported:
                # Finished after the stop's deadline: the report is out, but the file is
                # durable, so the state (journal) still learns of it.
                if outcome.kind != "error":
                    self.state.put(job.item.item_id, **outcome.fields)
                return
            self._record(job, outcome)
        except Exception as exc:
            self._halt_for(exc, job.item.item_id)
        finally:
            self.progress.in_flight -= 1
            self._queue.task_done()

    def _halt_for(self, exc: Exception, item_id: str | None = None) -> None:
        """Stop the pass for what the pager (no ``item_id``) or an item's job raised."""
        where = "paging" if item_id is None else "an item"
        ctx = {} if item_id is None else {"item_id": item_id}
        if isinstance(exc, BudgetExhausted):
            log.warning("daily request budget spent; stopping the pass", error=str(exc), **ctx)
            self._halt("daily_budget")
        elif isinstance(exc, StorageError) and item_id is not None:
            if self.fatal is None:  # once, not once per worker that meets it
                log.error("pausing: the images folder refuses writes", error=str(exc), **ctx)
            self._error(item_id, "write_failed", str(exc))
            self._halt(fatal=exc)
        elif isinstance(exc, FatalPassError | ConfigError | TokenUnavailable):
            log.error(f"{where} failed; the pass cannot complete", error=str(exc), **ctx)
            self._halt(fatal=exc)
        else:
            log.exception(f"unexpected error on {where}", **ctx)
            self._halt(fatal=FatalPassError(f"internal error on {where}: {exc!r}"))

    def _record(self, job: Job, outcome: Outcome) -> None:
        item_id = job.item.item_id
        self.progress.images_done += 1
        if outcome.kind == "error":
            assert outcome.reason is not None
            self._error(item_id, outcome.reason, outcome.detail or "")
            self.state.put(
                item_id,
                **outcome.fields,
                status="failed",
                reason=outcome.reason,
                detail=outcome.detail,
            )
            return
        self.state.put(item_id, **outcome.fields)
        if outcome.kind == "unchanged":
            self.stats.unchanged += 1
            return
        if outcome.kind == "new":
            self.stats.new += 1
        else:
            self.stats.updated += 1
        self.stats.images_downloaded += 1
        self.stats.bytes_downloaded += outcome.fields["bytes"]

    def _forget_unlisted(self) -> None:
        """After a complete pass, items Zoho no longer lists lose their local image."""
        gone = [i for i in self.state.items if i not in self._seen]
        if not gone:
            return
        if not self._seen:
            log.error("the catalogue came back empty; not deleting", held=len(gone))
            return
        forgotten = 0
        for item_id in gone:
            # Paging is not a snapshot: a deletion during the pass shifts later items onto
            # pages already read. Only an item missing from two complete scans in a row is
            # gone for sure.
            if not self.state.items[item_id].get("missing"):
                self.state.put(item_id, missing=True)
                continue
            exts = self._on_disk.get(item_id, ())
            if self.state.items[item_id].get("rebuilt"):
                # Adopted from the folder after the state was lost, never fetched since:
                # maybe not ours at all (a logo.jpg put there by hand). Never deleted.
                if exts:
                    log.warning(
                        "not deleting a file this program may not have written",
                        item_id=item_id,
                        exts=list(exts),
                    )
            elif exts and remove_item_images(self.images_dir, item_id, None, exts):
                self.stats.removed += 1
            self.state.drop(item_id)
            forgotten += 1
        log.info(
            "items missing from the catalogue",
            forgotten=forgotten,
            missing_once=len(gone) - forgotten,
        )

    def _report(self) -> dict[str, Any]:
        if self.fatal is not None:
            status = "failed"
        elif self.interrupted is not None:
            status = "interrupted"
        elif self.stats.errors:
            status = "partial"
        else:
            status = "success"
        report: dict[str, Any] = {"status": status, "statistics": self.stats.as_dict()}
        if status == "interrupted":
            report["reason"] = self.interrupted
        if self.fatal is not None:
            report["reason"] = str(self.fatal)
        report["errors"] = self.stats.errors_list
        report["finished_at"] = round(time.time(), 3)
        report["duration_seconds"] = round(time.time() - self.progress.started_at, 3)
        return report


async def _settled(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done without cancelling it if we are (``asyncio.wait``
    does the same, with more machinery than one future needs)."""
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def wake(_: object) -> None:
        if not waiter.done():
            waiter.set_result(None)

    future.add_done_callback(wake)
    try:
        await waiter
    finally:
        future.remove_done_callback(wake)


def image_identity(item: CatalogueItem, url: str) -> str:
    """What names this image: a change means a new download.

    Zoho's own endpoint URL depends on api_domain and the Inventory/Books choice, so for
    catalogue images the ``image_document_id`` alone is the identity; an explicit URL
    (url_map, the items file's image_url) is part of it.
    """
    if item.from_url_map:
        return f"url:{url}"
    if item.image_url:
        doc = f"doc:{item.image_document_id}|" if item.image_document_id else ""
        return f"{doc}url:{url}"
    return f"doc:{item.image_document_id}"


def _fetchable(url: str) -> bool:
    """An http(s) URL that parses, with a host and a valid port."""
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and port_ok


def _with_map(item: CatalogueItem) -> CatalogueItem:
    return dataclasses.replace(item, from_url_map=True)


def _scan_images(images_dir: Path) -> dict[str, tuple[str, ...]]:
    """Which image files each item has now: one directory read per pass, so a commit only
    unlinks the stale extensions that exist instead of trying all five (blocking)."""
    found: dict[str, tuple[str, ...]] = {}
    try:
        names = os.listdir(images_dir)
    except FileNotFoundError:
        # Removed while the daemon runs: made again, as at start, and every image it held
        # is fetched again. Should that fail, the first write stops the pass (DISK_WIDE).
        log.warning("images folder missing; creating it", images_dir=str(images_dir))
        with contextlib.suppress(OSError):
            os.makedirs(images_dir, exist_ok=True)
        return found
    for name in names:
        if parsed := split_image_name(name):
            item_id, ext = parsed
            found[item_id] = (*found.get(item_id, ()), ext)
    return found


def _changed_files(entries: list[tuple[str, Mapping[str, Any]]]) -> set[str]:
    """The items whose file is missing or not as recorded (blocking: one stat each)."""
    return {item_id for item_id, e in entries if not _stat_matches(e)}


def _stat_matches(prev: Mapping[str, Any]) -> bool:
    """The file is as recorded, without reading it: size, mtime and ctime unchanged.

    The ctime is git's trick: no program can set it, so a file rewritten in place with
    its size and mtime put back (``touch -d``) still shows, and its hash is checked. A
    chmod, a hard link or a restore changes it too: one hash, no download.
    """
    try:
        st = os.stat(prev["path"])
    except (OSError, KeyError, TypeError):
        return False
    return bool(
        st.st_size == prev.get("bytes")
        and st.st_mtime_ns == prev.get("mtime_ns")
        and st.st_ctime_ns == prev.get("ctime_ns")
    )
