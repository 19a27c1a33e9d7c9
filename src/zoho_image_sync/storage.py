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
import re
from collections.abc import Iterable
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


def image_path(images_dir: Path, item_id: str, ext: str) -> Path:
    """The final name of an item's image."""
    return images_dir / f"{item_id}.{ext}"


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_COUNTER = itertools.count()


def _unique() -> str:
    # pid + counter: unique among every writer on this host (O_EXCL refuses a clash anyway),
    # and far cheaper than secrets.token_hex, which showed in the per-image profile.
    return f"{os.getpid()}-{next(_COUNTER)}"


def temp_name(folder: Path, stem: str) -> Path:
    """A fresh temporary path in ``folder`` that the start-up sweep will recognise."""
    return folder / f"{TMP_PREFIX}{stem}-{_unique()}"


def _replace_durably(final: Path, data: bytes, mode: int) -> os.stat_result:
    """Temp file in the same folder, write, fchmod, fsync, rename, fsync the folder.

    Plain ``os`` calls on strings: at thousands of images a second pathlib's overhead showed
    in the profile. The mode is set on the descriptor, so it does not depend on the umask.
    """
    folder = str(final.parent)
    tmp = os.path.join(folder, f"{TMP_PREFIX}{final.name}-{_unique()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fchmod(fd, mode)
            os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(final.parent)
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


def sha256_file(path: Path) -> str:
    """The sha256 of a file's content (blocking)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def remove_item_images(
    images_dir: Path, item_id: str, keep: Path | None = None, exts: Iterable[str] = EXTENSIONS
) -> list[Path]:
    """Delete this item's images (those with an extension in ``exts``) but ``keep``; blocking."""
    removed = []
    folder = str(images_dir)
    keep_name = keep.name if keep is not None else None
    for ext in exts:
        name = f"{item_id}.{ext}"
        if name == keep_name:
            continue
        # One unlink attempt per extension: cheaper than a stat and then an unlink.
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            continue
        removed.append(images_dir / name)
    return removed


def _commit_bytes(
    final: Path, data: bytes, item_id: str, stale: Iterable[str]
) -> tuple[os.stat_result, str]:
    """One thread hop per image: hash, write durably, drop the stale extensions.

    The hash is taken here, off the event loop: chunk by chunk on the loop it showed in
    the profile, and so did a second thread hop for the stat.
    """
    digest = hashlib.sha256(data).hexdigest()
    st = _replace_durably(final, data, 0o644)
    remove_item_images(final.parent, item_id, final, stale)
    return st, digest


class ImageSink:
    """Receives one image's body chunk by chunk and commits it atomically.

    Bytes are kept in memory up to ``spill_bytes`` (one thread hop per image for the
    common 30-300 KB case) and spilled to a temporary file through aiofiles beyond
    that, so memory stays bounded at workers x spill_bytes whatever the image size.
    """

    def __init__(self, images_dir: Path, item_id: str, spill_bytes: int = 1 << 20) -> None:
        self.images_dir = images_dir
        self.item_id = item_id
        self.spill_bytes = spill_bytes
        self.size = 0
        self._hash = hashlib.sha256()  # fed only once spilled; else hashed at commit
        self._digest: str | None = None
        self._buf = bytearray()
        self._head = b""
        self._tmp: Path | None = None
        self._file: aiofiles.threadpool.binary.AsyncBufferedIOBase | None = None
        self.stat: os.stat_result | None = None

    @property
    def head(self) -> bytes:
        """The first bytes received, for the magic-number check."""
        return self._head

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

    async def commit(self, ext: str, stale: Iterable[str] | None = None) -> Path:
        """Flush, fsync and rename into ``{images_dir}/{item_id}.{ext}``; fsync the folder.

        ``stale``: the extensions this item may have on disk besides ``ext`` (None: any).
        """
        final = image_path(self.images_dir, self.item_id, ext)
        stale = EXTENSIONS if stale is None else tuple(stale)
        if self._file is None:
            data = bytes(self._buf)
            self._buf = bytearray()
            self.stat, self._digest = await asyncio.to_thread(
                _commit_bytes, final, data, self.item_id, stale
            )
            return final
        else:
            f, tmp = self._file, self._tmp
            assert tmp is not None
            self._file = None
            try:
                await f.flush()
                await asyncio.to_thread(os.fsync, f.fileno())
            finally:
                await f.close()
            # The same mode as the small-image path, whatever the umask: the ERP reads these.
            await asyncio.to_thread(os.chmod, tmp, 0o644)
            await aiofiles.os.replace(tmp, final)
            self._tmp = None
            await asyncio.to_thread(fsync_dir, self.images_dir)
        await asyncio.to_thread(remove_item_images, self.images_dir, self.item_id, final, stale)
        self.stat = await asyncio.to_thread(os.stat, final)
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
