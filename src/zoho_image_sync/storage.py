"""Atomic files: images and JSON documents reach their final name complete or not at all.

Every write goes to a temporary file in the same folder, is flushed and fsynced,
renamed over the final name, and the folder is fsynced so the rename survives a
power loss. Temporaries carry a recognisable prefix so a start can sweep them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import queue
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiofiles
import aiofiles.os

TMP_PREFIX: Final = ".zis-tmp-"
ITEM_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
EXTENSIONS: Final = ("jpg", "png", "gif", "webp", "bmp")
MAGIC_PREFIX_BYTES: Final = 12


def valid_item_id(item_id: object) -> bool:
    """True when ``item_id`` is safe to use as a file name (the contract's pattern)."""
    return isinstance(item_id, str) and ITEM_ID_RE.fullmatch(item_id) is not None


def sniff_image(head: bytes) -> str | None:
    """The image type from its magic number, or None when these bytes are no image we take."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if len(head) >= 12 and head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM") and len(head) >= 10 and head[6:10] == b"\0\0\0\0":
        return "bmp"  # "BM", file size, then four reserved zero bytes
    return None


def image_path(images_dir: Path | str, item_id: str, ext: str) -> str:
    """The final name of an item's image (a string: pathlib showed in the per-image profile)."""
    return f"{images_dir}{os.sep}{item_id}.{ext}"


def fsync_dir(folder: Path | str) -> None:
    """Make a rename or unlink in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_COUNTER = itertools.count()
_PID = os.getpid()


def _after_fork() -> None:
    global _PID
    _PID = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def _unique() -> str:
    # pid + counter: unique among every writer on this host (O_EXCL refuses a clash anyway),
    # and far cheaper than secrets.token_hex, which showed in the per-image profile. The pid
    # is cached (13,000 getpid calls in a 5,000-image pass otherwise).
    return f"{_PID}-{next(_COUNTER)}"


def temp_name(folder: Path, stem: str) -> Path:
    """A fresh temporary path in ``folder`` that the start-up sweep will recognise."""
    return folder / f"{TMP_PREFIX}{stem}-{_unique()}"


def _replace_durably(
    final: Path | str, data: bytes, mode: int, sync_folder: bool = True
) -> os.stat_result:
    """Temp file in the same folder, write, fsync, rename, fsync the folder.

    Plain ``os`` calls on strings: at thousands of images a second pathlib's overhead showed
    in the profile. The mode does not depend on the umask: the descriptor is fchmod-ed when
    the umask took bits away. ``sync_folder=False`` leaves the folder fsync to the caller
    (the image writer does one per batch).
    """
    folder, name = os.path.split(final)
    tmp = f"{folder}{os.sep}{TMP_PREFIX}{name}-{_unique()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
            st = os.fstat(fd)
            if st.st_mode & 0o7777 != mode:
                os.fchmod(fd, mode)
                st = os.fstat(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_folder:
        fsync_dir(folder)
    return st


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically and durably (blocking; call in a thread)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_durably(path, data, mode)


def sweep_temporaries(folder: Path) -> int:
    """Remove temporaries left by a crash; returns how many were removed."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name.startswith(TMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    if removed:
        fsync_dir(folder)
    return removed


def sha256_file(path: Path | str) -> tuple[str, os.stat_result]:
    """The sha256 of a file's content and the stat of what was hashed (blocking)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
        return h.hexdigest(), os.fstat(f.fileno())


def split_image_name(name: str) -> tuple[str, str] | None:
    """``(item_id, ext)`` for a file name of the images folder, None for anything else."""
    item_id, dot, ext = name.rpartition(".")
    return (item_id, ext) if dot and ext in EXTENSIONS else None


def remove_item_images(
    images_dir: Path | str,
    item_id: str,
    keep: Path | str | None = None,
    exts: Iterable[str] = EXTENSIONS,
) -> list[Path]:
    """Delete this item's images (those with an extension in ``exts``) but ``keep``; blocking."""
    removed = []
    folder = str(images_dir)
    keep_name = os.path.basename(keep) if keep is not None else None
    for ext in exts:
        name = f"{item_id}.{ext}"
        if name == keep_name:
            continue
        # One unlink attempt per extension: cheaper than a stat and then an unlink.
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            continue
        removed.append(Path(folder, name))
    return removed


def _commit_bytes(
    final: str, data: bytes, item_id: str, stale: Iterable[str], sync_folder: bool = True
) -> tuple[os.stat_result, str]:
    """Hash, write durably, drop the stale extensions (blocking).

    The hash is taken here, off the event loop: chunk by chunk on the loop it showed in
    the profile, and so did a second thread hop for the stat.
    """
    digest = hashlib.sha256(data).hexdigest()
    st = _replace_durably(final, data, 0o644, sync_folder)
    if stale:
        remove_item_images(os.path.dirname(final), item_id, final, stale)
    return st, digest


def _place_spilled(tmp: Path, final: str, item_id: str, stale: Iterable[str]) -> os.stat_result:
    """Put a spilled (already fsynced) temporary in place; one thread hop (blocking)."""
    # The same mode as the small-image path, whatever the umask: the ERP reads these.
    os.chmod(tmp, 0o644)
    os.replace(tmp, final)
    folder = os.path.dirname(final)
    fsync_dir(folder)
    remove_item_images(folder, item_id, final, stale)
    return os.stat(final)


Committed = tuple[os.stat_result, str]


@dataclass(slots=True)
class _Request:
    final: str
    folder: str
    data: bytes
    item_id: str
    stale: tuple[str, ...]
    future: asyncio.Future[Committed]
    result: Committed | None = None
    error: BaseException | None = None


def _deliver(batch: list[_Request]) -> None:
    for req in batch:
        if req.future.done():  # the waiting worker was cancelled; the file is written anyway
            continue
        if req.error is not None:
            req.future.set_exception(req.error)
        else:
            assert req.result is not None
            req.future.set_result(req.result)


class ImageWriter:
    """One thread that writes every image of a pass, in batches (group commit).

    A worker hands over an image's bytes and awaits a future. The thread takes whatever is
    queued (up to ``max_batch``), writes and fsyncs each file and renames it into place,
    then fsyncs each folder once for the whole batch and wakes the event loop once. A
    future resolves only after its folder fsync: an image counts as written when its
    rename is durable, as before. Against one ``asyncio.to_thread`` per image this saves
    the executor's hand-offs, most folder fsyncs and most loop wake-ups; the profile put
    those at ~40 % of the CPU per image.
    """

    def __init__(self, max_batch: int = 64) -> None:
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (call from the event loop that will await the commits)."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="zis-image-writer", daemon=True)
        self._thread.start()

    def submit(
        self,
        final: Path | str,
        data: bytes,
        item_id: str,
        stale: tuple[str, ...],
        folder: str | None = None,
    ) -> asyncio.Future[Committed]:
        """Queue ``data`` for ``final``; the future gives its stat and sha256 once durable.

        ``folder``: ``final``'s folder, when the caller has it at hand.
        """
        if self._thread is None or self._loop is None:
            raise RuntimeError("ImageWriter.submit before start()")
        future: asyncio.Future[Committed] = self._loop.create_future()
        final = os.fspath(final)
        if folder is None:
            folder = os.path.dirname(final)
        self._queue.put(_Request(final, folder, data, item_id, stale, future))
        return future

    async def aclose(self, wait_at_most: float | None = None) -> bool:
        """Finish everything queued, then stop the thread; False if ``wait_at_most`` ran out.

        After that the (daemon) thread goes on with what is queued: a stuck disk must
        not hold a shutdown past its deadline. Its late results are still delivered.
        """
        thread, self._thread = self._thread, None
        if thread is None:
            return True
        self._queue.put(None)
        join = asyncio.ensure_future(asyncio.to_thread(thread.join))
        done, _ = await asyncio.wait({join}, timeout=wait_at_most)
        return bool(done)

    @staticmethod
    def _write_batch(batch: list[_Request]) -> None:
        folders: dict[str, list[_Request]] = {}
        for req in batch:
            try:
                req.result = _commit_bytes(req.final, req.data, req.item_id, req.stale, False)
            except Exception as exc:  # delivered to the worker that waits for it
                req.error = exc
            else:
                folders.setdefault(req.folder, []).append(req)
            req.data = b""
        for folder, reqs in folders.items():
            try:
                fsync_dir(folder)
            except OSError as exc:
                for req in reqs:
                    req.result, req.error = None, exc

    def _run(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        loop = self._loop
        assert loop is not None
        while True:
            first = get()
            if first is None:
                return
            batch = [first]
            last = False
            while len(batch) < self.max_batch:
                try:
                    req = get_nowait()
                except queue.Empty:
                    break
                if req is None:
                    last = True
                    break
                batch.append(req)
            try:
                self._write_batch(batch)
            except BaseException as exc:  # never leave a worker waiting on a dead thread
                for req in batch:
                    if req.result is None and req.error is None:
                        req.error = exc
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return
            if last:
                return


class ImageSink:
    """Receives one image's body chunk by chunk and commits it atomically.

    Bytes are kept in memory up to ``spill_bytes`` (one thread hop per image for the
    common 30-300 KB case) and spilled to a temporary file through aiofiles beyond
    that, so memory stays bounded at workers x spill_bytes whatever the image size.
    """

    __slots__ = (
        "_buf",
        "_digest",
        "_file",
        "_folder",
        "_hash",
        "_head",
        "_tmp",
        "images_dir",
        "item_id",
        "size",
        "spill_bytes",
        "stat",
    )

    def __init__(
        self,
        images_dir: Path,
        item_id: str,
        spill_bytes: int = 1 << 20,
    ) -> None:
        self.images_dir = images_dir
        self._folder = str(images_dir)
        self.item_id = item_id
        self.spill_bytes = spill_bytes
        self.size = 0
        self._hash = hashlib.sha256()  # fed only once spilled; else hashed at commit
        self._digest: str | None = None
        self._buf: bytes | bytearray = bytearray()
        self._head = b""
        self._tmp: Path | None = None
        self._file: aiofiles.threadpool.binary.AsyncBufferedIOBase | None = None
        self.stat: os.stat_result | None = None

    @property
    def head(self) -> bytes:
        """The first bytes received, for the magic-number check."""
        return self._head

    def take(self, body: bytes) -> None:
        """Take a whole body of at most ``spill_bytes`` at once (nothing received before)."""
        assert self.size == 0 and self._file is None and len(body) <= self.spill_bytes
        self.size = len(body)
        self._head = body[:MAGIC_PREFIX_BYTES]
        self._buf = body  # no copy: bytes(self._buf) at commit is this very object

    async def write(self, chunk: bytes) -> None:
        """Take the next chunk."""
        self.size += len(chunk)
        if len(self._head) < MAGIC_PREFIX_BYTES:
            self._head = (self._head + chunk[:MAGIC_PREFIX_BYTES])[:MAGIC_PREFIX_BYTES]
        if self._file is None:
            self._buf += chunk
            if len(self._buf) > self.spill_bytes:
                self._tmp = temp_name(self.images_dir, self.item_id)
                self._file = await aiofiles.open(self._tmp, "xb")
                self._hash.update(self._buf)
                await self._file.write(bytes(self._buf))
                self._buf = bytearray()
        else:
            self._hash.update(chunk)
            await self._file.write(chunk)

    def sha256(self) -> str:
        """Hex digest of the committed image."""
        return self._digest if self._digest is not None else self._hash.hexdigest()

    @property
    def in_memory(self) -> bool:
        """Nothing spilled to disk: the writer thread can take the whole body."""
        return self._file is None

    def hand_over(
        self, writer: ImageWriter, ext: str, stale: Iterable[str] | None = None
    ) -> tuple[str, asyncio.Future[Committed]]:
        """Queue an in-memory body for ``writer`` and return at once (see ``commit``).

        Pass the future's result to ``committed`` once it is done.
        """
        final, data, stale_exts = self._take_buffer(ext, stale)
        return final, writer.submit(final, data, self.item_id, stale_exts, self._folder)

    def _take_buffer(
        self, ext: str, stale: Iterable[str] | None
    ) -> tuple[str, bytes, tuple[str, ...]]:
        assert self._file is None
        final = image_path(self._folder, self.item_id, ext)
        data, self._buf = bytes(self._buf), bytearray()
        return final, data, EXTENSIONS if stale is None else tuple(stale)

    def committed(self, done: Committed) -> None:
        """Take the stat and sha256 of a handed-over body once the writer has it durable."""
        self.stat, self._digest = done

    async def commit(self, ext: str, stale: Iterable[str] | None = None) -> str:
        """Flush, fsync and rename into ``{images_dir}/{item_id}.{ext}``; fsync the folder.

        ``stale``: the extensions this item may have on disk besides ``ext`` (None: any).
        """
        if self._file is None:
            final, data, stale_exts = self._take_buffer(ext, stale)
            self.stat, self._digest = await asyncio.to_thread(
                _commit_bytes, final, data, self.item_id, stale_exts
            )
            return final
        final = image_path(self._folder, self.item_id, ext)
        stale = EXTENSIONS if stale is None else tuple(stale)
        f, tmp = self._file, self._tmp
        assert tmp is not None
        self._file = None
        try:
            await f.flush()
            await asyncio.to_thread(os.fsync, f.fileno())
        finally:
            await f.close()
        self.stat = await asyncio.to_thread(_place_spilled, tmp, final, self.item_id, stale)
        self._tmp = None
        return final

    def reset(self) -> None:
        """Start over for a retry (call ``discard`` first)."""
        self.size = 0
        self._hash = hashlib.sha256()
        self._digest = None
        self._head = b""

    async def discard(self) -> None:
        """Drop everything received; no file is left behind."""
        self._buf = bytearray()
        if self._file is not None:
            with contextlib.suppress(OSError):
                await self._file.close()
            self._file = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                await aiofiles.os.remove(self._tmp)
            self._tmp = None
