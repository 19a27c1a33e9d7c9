"""Atomic files: images and JSON documents reach their final name complete or not at all.

Every write goes to a temporary file in the same folder, is flushed and fsynced,
renamed over the final name, and the folder is fsynced so the rename survives a
power loss. Temporaries carry a recognisable prefix so a start can sweep them.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import errno
import functools
import hashlib
import itertools
import json
import mmap
import os
import queue
import re
import socket
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import aiofiles
import aiofiles.os
import structlog

from . import durable
from .durable import (
    EXTENSIONS,
    TMP_PREFIX,
    fsync_dir,
    remove_item_images,
    replace_durably,
    unique,
)

__all__ = [
    "EXTENSIONS",
    "TMP_PREFIX",
    "fsync_dir",
    "remove_item_images",
    "replace_durably",
]

log = structlog.get_logger(__name__)

SPILL_BYTES: Final = 1 << 20  # an image body up to this size is held in memory
ITEM_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
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


def temp_name(folder: Path, stem: str) -> Path:
    """A fresh temporary path in ``folder`` that the start-up sweep will recognise."""
    return folder / f"{TMP_PREFIX}{stem}-{unique()}"


def write_bytes_atomic(
    path: Path, data: bytes, mode: int = 0o644, only_over_files: bool = False
) -> None:
    """Write ``data`` to ``path`` atomically and durably (blocking; call in a thread).

    ``only_over_files``: for a path a user names (export, audit list): a device, pipe,
    folder or symbolic link there is refused, not replaced by the rename.
    """
    if only_over_files:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EEXIST, "exists and is not a regular file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_durably(path, data, mode)


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
        # The stat from before the read: a change made while hashing shows in a later
        # pass's comparison (its ctime differs) instead of hiding behind this one.
        st = os.fstat(f.fileno())
        while chunk := f.read(1 << 20):
            h.update(chunk)
        return h.hexdigest(), st


def split_image_name(name: str) -> tuple[str, str] | None:
    """``(item_id, ext)`` for a file name of the images folder, None for anything else."""
    item_id, dot, ext = name.rpartition(".")
    return (item_id, ext) if dot and ext in EXTENSIONS else None


Committed = tuple[int, int, str]  # the file's mtime_ns and ctime_ns, its content's sha256


def _place_spilled(tmp: Path, final: str, item_id: str, stale: Iterable[str]) -> os.stat_result:
    """Put a spilled (already fsynced) temporary in place; one thread hop (blocking)."""
    # The same mode as the small-image path, whatever the umask: the ERP reads these.
    os.chmod(tmp, 0o644)
    os.replace(tmp, final)
    st = os.stat(final)  # at once: the rename set the ctime, and nothing else has the file
    folder = os.path.dirname(final)
    fsync_dir(folder)
    remove_item_images(folder, item_id, final, stale)
    return st


@dataclass(slots=True)
class _Request:
    final: str
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
        self._finished: asyncio.Future[None] | None = None  # the thread's last act sets it
        self._closing = False

    def start(self) -> None:
        """Start the thread (call from the event loop that will await the commits)."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._finished = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name="zis-image-writer", daemon=True)
        self._thread.start()

    def submit(
        self,
        final: Path | str,
        data: bytes,
        item_id: str,
        stale: tuple[str, ...],
    ) -> asyncio.Future[Committed]:
        """Queue ``data`` for ``final``; the future gives its stat and sha256 once durable."""
        if self._thread is None or self._loop is None:
            raise RuntimeError("ImageWriter.submit before start()")
        future: asyncio.Future[Committed] = self._loop.create_future()
        final = os.fspath(final)
        self._queue.put(_Request(final, data, item_id, stale, future))
        return future

    async def aclose(self, wait_at_most: float | None = None) -> bool:
        """Finish everything queued, then stop the thread; False if ``wait_at_most`` ran out.

        After that the (daemon) thread goes on with what is queued: a stuck disk must
        not hold a shutdown past its deadline. Its late results are still delivered, and
        another ``aclose`` waits for the rest.
        """
        if self._finished is None:
            return True  # never started
        if not self._closing:
            self._closing = True
            self._thread = None  # it takes no more images
            self._queue.put(None)
        # Not a join in an executor thread: one stuck on the disk would hold up the event
        # loop's own shutdown (asyncio.run waits for its executor's threads).
        done, _ = await asyncio.wait({self._finished}, timeout=wait_at_most)
        return bool(done)

    @property
    def closing(self) -> bool:
        """``aclose`` was called: it takes no more images."""
        return self._closing

    @staticmethod
    def _write_batch(batch: list[_Request]) -> None:
        group = durable.Batch()
        for req in batch:
            group.write(req.final, req.data, req.item_id, req.stale)
            req.data = b""
        for req, result in zip(batch, group.sync(), strict=True):
            if isinstance(result, Exception):
                req.error = result
            else:
                req.result = result

    def _run(self) -> None:
        loop, finished = self._loop, self._finished
        assert loop is not None and finished is not None
        try:
            self._serve(loop)
        finally:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting
                loop.call_soon_threadsafe(_resolve, finished)

    def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
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


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Writer(Protocol):
    """What a pass needs of an image writer (``ImageWriter``, ``ProcessImageWriter``)."""

    def start(self) -> None: ...

    def submit(
        self,
        final: Path | str,
        data: bytes,
        item_id: str,
        stale: tuple[str, ...],
    ) -> asyncio.Future[Committed]: ...

    async def aclose(self, wait_at_most: float | None = None) -> bool: ...


WRITER_PROCESS: bool = sys.platform == "linux" and hasattr(os, "memfd_create")
"""Write images in a child process where the platform allows (tests turn it off)."""


def new_image_writer() -> Writer:
    """The image writer for a pass: a process where possible, else a thread."""
    return ProcessImageWriter() if WRITER_PROCESS else ImageWriter()


class _Arena:
    """Shared memory (one memfd) cut into ``ARENA_SLOTS`` slots, each carrying one body
    at a time to the process. Sparse: only the pages a body touches take memory. One fd
    per arena, not per slot (mmap keeps a duplicate of its fd open, in both processes).
    """

    __slots__ = ("fd", "index", "mm", "used")

    def __init__(self, index: int, size: int) -> None:
        self.index = index
        self.used = 0  # slots handed out so far
        self.fd: int | None = os.memfd_create(f"zis-images-{index}")
        try:
            os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.mm.close()


ARENA_SLOTS: Final = 16


@dataclass(slots=True)
class _Slot:
    arena: _Arena
    offset: int


@dataclass(slots=True)
class _Sent:
    slot: _Slot
    length: int
    final: str
    item_id: str
    stale: tuple[str, ...]
    future: asyncio.Future[Committed]


class ProcessImageWriter:
    """The image writer in a child process (``durable.py``): no GIL shared with the loop.

    A worker's body is copied into a shared memory slot and a short request goes over a
    socket; the process hashes, writes, fsyncs and renames each file, fsyncs each folder
    once per batch, and answers once per batch; the loop reads the answers when the
    socket is readable. A slot is reused only after its answer. Same contract as
    ``ImageWriter``: a future resolves once the image's rename is durable.

    Should the process fail (killed by the OOM killer, a bug, a garbled answer), nothing
    is lost: it is killed if still alive, and the bodies it had not answered for (still in
    their slots) go, with everything after, to an ``ImageWriter`` thread in this process.
    """

    def __init__(self, slot_bytes: int = SPILL_BYTES) -> None:
        self.slot_bytes = slot_bytes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._head = struct.Struct(durable.REQUEST_HEAD)
        self._ids = itertools.count()
        self._arenas: list[_Arena] = []
        self._free: list[_Slot] = []
        self._sent: dict[int, _Sent] = {}
        self._unsent: collections.deque[tuple[bytes, _Arena]] = collections.deque()
        self._waiting_for_room = False  # the socket was full: a writer callback is set
        self._answers = bytearray(durable.MAX_ANSWER)
        self._gone: asyncio.Event | None = None  # its socket is closed
        self._exited: asyncio.Event | None = None  # it is reaped
        self._closing = False
        self._broken = False  # the process failed: threads write everything
        self._threads: list[ImageWriter] = []

    @property
    def pid(self) -> int | None:
        """The writer process's pid while it runs."""
        return None if self._proc is None or self._sock is None else self._proc.pid

    def start(self) -> None:
        """Bind to the running event loop; the process starts with the first image (a pass
        with nothing to download spawns nothing)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._gone = asyncio.Event()
            self._exited = asyncio.Event()

    def _spawn(self) -> None:
        assert self._loop is not None and self._gone is not None
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            self._no_process(exc)
            return
        try:
            argv = [sys.executable, "-I", "-S", durable.__file__, str(theirs.fileno())]
            self._proc = subprocess.Popen(
                [*argv, str(os.getpid())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},  # no secrets
            )
        except (OSError, ValueError) as exc:  # no interpreter to run: write in this process
            ours.close()
            self._no_process(exc)
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._loop.add_reader(ours.fileno(), self._on_answers)
        try:  # reaped when it exits, with no thread blocked in wait() (see ImageWriter.aclose)
            pidfd = os.pidfd_open(self._proc.pid)
        except (OSError, AttributeError):  # a kernel before 5.3: a thread waits for it
            waiter = asyncio.ensure_future(asyncio.to_thread(self._proc.wait))
            waiter.add_done_callback(lambda _: self._on_exit(None))
            return
        self._loop.add_reader(pidfd, self._on_exit, pidfd)

    def _on_exit(self, pidfd: int | None) -> None:
        assert self._loop is not None and self._proc is not None and self._exited is not None
        if pidfd is not None:
            self._loop.remove_reader(pidfd)
            os.close(pidfd)
        code = self._proc.wait()  # it has exited: no wait
        if self._broken:
            log.info("image writer process ended", exit_status=code)
        self._exited.set()

    def _no_process(self, exc: BaseException) -> None:
        assert self._gone is not None
        log.warning("image writer process did not start; writing in a thread", error=str(exc))
        self._broken = True
        self._gone.set()

    def submit(
        self,
        final: Path | str,
        data: bytes,
        item_id: str,
        stale: tuple[str, ...],
    ) -> asyncio.Future[Committed]:
        """Queue ``data`` for ``final``; the future gives its stat and sha256 once durable."""
        if self._loop is None:
            raise RuntimeError("ProcessImageWriter.submit before start()")
        final = os.fspath(final)
        if self._proc is None and not self._broken and not self._closing:
            self._spawn()
        if self._broken or self._closing or len(data) > self.slot_bytes:
            return self._thread().submit(final, data, item_id, stale)
        if self._free:
            slot = self._free.pop()
        else:
            try:
                slot = self._new_slot()
            except OSError as exc:  # no memfd (a seccomp filter), no memory, no fd left
                self._child_failed(f"no shared memory: {exc}")
                return self._thread().submit(final, data, item_id, stale)
        length = len(data)
        slot.arena.mm[slot.offset : slot.offset + length] = data
        future: asyncio.Future[Committed] = self._loop.create_future()
        rid = next(self._ids)
        self._sent[rid] = _Sent(slot, length, final, item_id, stale, future)
        packet = self._head.pack(rid, slot.arena.index, slot.offset, length) + b"\0".join(
            (os.fsencode(final), item_id.encode(), ",".join(stale).encode())
        )
        self._unsent.append((packet, slot.arena))
        if len(self._unsent) == 1:
            self._send_unsent()
        return future

    def _send_unsent(self) -> None:
        """Send what is waiting, in order; a full socket waits for room (back-pressure
        from a slow disk, with hundreds of workers), it is no failure."""
        sock, loop = self._sock, self._loop
        assert sock is not None and loop is not None
        while self._unsent:
            packet, arena = self._unsent[0]
            try:
                if arena.fd is None:
                    sock.send(packet)
                else:  # the arena's first request carries its memfd
                    fds = array.array("i", (arena.fd,))
                    sock.sendmsg([packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                    os.close(arena.fd)  # the mapping stays; the process has its own fd
                    arena.fd = None
            except BlockingIOError:
                if not self._waiting_for_room:
                    loop.add_writer(sock.fileno(), self._send_unsent)
                    self._waiting_for_room = True
                return
            except OSError as exc:  # it is gone (the end of its socket is read next)
                self._child_failed(f"request not sent: {exc}")
                return
            self._unsent.popleft()
        if self._waiting_for_room:
            loop.remove_writer(sock.fileno())
            self._waiting_for_room = False
        if self._closing:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)  # it answers what it has, then exits

    def _on_answers(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                n = sock.recv_into(self._answers)
            except BlockingIOError:
                return
            except OSError:
                n = 0
            if n == 0:
                self._ended()
                return
            try:
                for answer in json.loads(self._answers[:n]):
                    self._deliver(answer)
            except (ValueError, LookupError, TypeError) as exc:  # never leave a worker waiting
                self._child_failed(f"unreadable answer: {exc!r}"[:200])
                return
            if self._sock is None:
                return

    def _deliver(self, answer: list[Any]) -> None:
        # Read all of it before taking the request out of _sent: a malformed answer raises
        # here and _child_failed then hands the request, still in _sent, to the thread.
        rid, mtime_ns, *rest = answer
        sent = self._sent[rid]
        result: Committed | None = None
        error: BaseException | None = None
        if mtime_ns is not None:
            ctime_ns, digest = rest
            if not (
                isinstance(mtime_ns, int) and isinstance(ctime_ns, int) and isinstance(digest, str)
            ):
                raise TypeError(f"answer {answer!r:.100}")
            result = (mtime_ns, ctime_ns, digest)
        else:
            code, text, filename = rest
            if code is None:
                error = RuntimeError(f"image writer process: {text}")
            else:
                error = OSError(code, text, filename)
        del self._sent[rid]
        self._free.append(sent.slot)
        future = sent.future
        if future.done():  # the waiting worker was cancelled; the file is written anyway
            return
        if result is not None:
            future.set_result(result)
        elif error is not None:
            future.set_exception(error)

    def _ended(self) -> None:
        """The socket reached its end: the process exited (or is about to)."""
        if self._sent or not self._closing:
            self._child_failed(f"it exited with {len(self._sent)} images unanswered")
        else:
            self._drop_socket()
        if self._closing:  # after a late answer (past aclose's deadline) too
            self._release_slots()

    def _drop_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            assert self._loop is not None and self._gone is not None
            self._loop.remove_reader(sock.fileno())
            if self._waiting_for_room:
                self._loop.remove_writer(sock.fileno())
                self._waiting_for_room = False
            sock.close()
            self._gone.set()
        self._unsent.clear()

    def _new_slot(self) -> _Slot:
        arena = self._arenas[-1] if self._arenas else None
        if arena is None or arena.used == ARENA_SLOTS:
            arena = _Arena(len(self._arenas), ARENA_SLOTS * self.slot_bytes)
            self._arenas.append(arena)
        slot = _Slot(arena, arena.used * self.slot_bytes)
        arena.used += 1
        return slot

    def _release_slots(self) -> None:
        self._free.clear()
        for arena in self._arenas:
            arena.close()
        self._arenas.clear()

    def _child_failed(self, why: str) -> None:
        """Hand every unanswered body (still in its slot) to a thread; use it from now on."""
        proc = self._proc
        if not self._broken:
            log.error("image writer process failed; writing in a thread", why=why)
        self._broken = True
        if proc is not None and proc.returncode is None:
            # What it still holds is written again by the thread; it must not write too.
            with contextlib.suppress(OSError):
                proc.kill()
        self._drop_socket()
        thread = self._thread()
        sent, self._sent = self._sent, {}
        for s in sent.values():
            if s.future.done():
                continue
            body = s.slot.arena.mm[s.slot.offset : s.slot.offset + s.length]
            again = thread.submit(s.final, body, s.item_id, s.stale)
            again.add_done_callback(functools.partial(_chain, s.future))

    def _thread(self) -> ImageWriter:
        if not self._threads or self._threads[-1].closing:
            writer = ImageWriter()
            writer.start()
            self._threads.append(writer)
        return self._threads[-1]

    async def aclose(self, wait_at_most: float | None = None) -> bool:
        """Finish everything sent, then let the process end; False if ``wait_at_most`` ran
        out (it then goes on in the background, its late answers are still delivered, and
        another ``aclose`` waits for the rest)."""
        if self._loop is None:
            return True
        loop = self._loop
        deadline = None if wait_at_most is None else loop.time() + wait_at_most
        if not self._closing:
            self._closing = True
            if self._sock is not None and not self._unsent:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_WR)  # it answers what it has, then exits
        if self._proc is not None:
            assert self._gone is not None
            gone = asyncio.ensure_future(self._gone.wait())
            if not (await asyncio.wait({gone}, timeout=wait_at_most))[0]:
                gone.cancel()
                for thread in self._threads:
                    await thread.aclose(0)  # a thread ends once it has written its queue
                return False
        for thread in self._threads:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            if not await thread.aclose(left):
                return False
        if self._proc is not None:
            # Its socket has closed: it is exiting (or was killed). Wait until it is reaped.
            assert self._exited is not None
            left = None if deadline is None else max(0.0, deadline - loop.time())
            exited = asyncio.ensure_future(self._exited.wait())
            if not (await asyncio.wait({exited}, timeout=left))[0]:
                exited.cancel()
                return False
        self._release_slots()
        return True


def _chain(target: asyncio.Future[Committed], source: asyncio.Future[Committed]) -> None:
    if target.done():
        return
    if source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(source.result())


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
        "ctime_ns",
        "images_dir",
        "item_id",
        "mtime_ns",
        "size",
        "spill_bytes",
    )

    def __init__(
        self,
        images_dir: Path,
        item_id: str,
        spill_bytes: int = SPILL_BYTES,
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
        self.mtime_ns: int | None = None  # the committed file's
        self.ctime_ns: int | None = None

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
        """Nothing spilled to disk: the image writer can take the whole body."""
        return self._file is None

    def hand_over(
        self, writer: Writer, ext: str, stale: Iterable[str] | None = None
    ) -> tuple[str, asyncio.Future[Committed]]:
        """Queue an in-memory body for ``writer`` and return at once (see ``commit``).

        Pass the future's result to ``committed`` once it is done.
        """
        final, data, stale_exts = self._take_buffer(ext, stale)
        return final, writer.submit(final, data, self.item_id, stale_exts)

    def _take_buffer(
        self, ext: str, stale: Iterable[str] | None
    ) -> tuple[str, bytes, tuple[str, ...]]:
        assert self._file is None
        final = image_path(self._folder, self.item_id, ext)
        data, self._buf = bytes(self._buf), bytearray()
        return final, data, EXTENSIONS if stale is None else tuple(stale)

    def committed(self, done: Committed) -> None:
        """Take the stat and sha256 of a handed-over body once the writer has it durable."""
        self.mtime_ns, self.ctime_ns, self._digest = done

    async def commit(self, ext: str, stale: Iterable[str] | None = None) -> str:
        """Flush, fsync and rename into ``{images_dir}/{item_id}.{ext}``; fsync the folder.

        ``stale``: the extensions this item may have on disk besides ``ext`` (None: any).
        """
        if self._file is None:
            final, data, stale_exts = self._take_buffer(ext, stale)
            self.mtime_ns, self.ctime_ns, self._digest = await asyncio.to_thread(
                durable.commit_bytes, final, data, self.item_id, stale_exts, True
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
        st = await asyncio.to_thread(_place_spilled, tmp, final, self.item_id, stale)
        self.mtime_ns, self.ctime_ns = st.st_mtime_ns, st.st_ctime_ns
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
