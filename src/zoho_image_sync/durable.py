"""Durable writes (temporary, fsync, rename, folder fsync), and the image writer process.

Standard library only, and no import from this package: the image writer process runs
this file as a script (``python -I -S durable.py FD PARENT_PID``) so that it starts in
about 20 ms and shares nothing with the daemon but the socket it is given.

Why a process: the event loop's thread and a writer thread share one GIL. A file write
releases it for every system call (open, write, fsync, fstat, close, rename) and must
win it back from the busy loop each time; at thousands of images a second that hand-off,
not the disk, bounded a pass. The process has its own interpreter.

The protocol (one ``AF_UNIX``/``SOCK_SEQPACKET`` socket, so every message is one packet):

- request: ``REQUEST_HEAD`` (request id, arena id, offset, body length), then
  ``final\\0item_id\\0stale`` (``stale``: comma-separated extensions), with the arena's
  memfd attached (SCM_RIGHTS) the first time that arena is used. The body is ``length``
  bytes at ``offset`` in the arena, shared memory the daemon filled and does not touch
  until the answer.
- answer: one JSON list per batch, ``[id, mtime_ns, ctime_ns, sha256]`` for a durable image or
  ``[id, null, errno, strerror, filename]`` for a failed one.

The process ignores the signals meant for the daemon (a Ctrl-C reaches the whole
process group; the daemon drains and then closes the socket), dies with the daemon
(PR_SET_PDEATHSIG: it never writes once the daemon is gone, as a thread would not), and
exits when the socket reaches its end, after answering everything it received.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import sys
from collections.abc import Iterable
from typing import Final

TMP_PREFIX: Final = ".zis-tmp-"
EXTENSIONS: Final = ("jpg", "png", "gif", "webp", "bmp")


def fsync_dir(folder: str | os.PathLike[str]) -> None:
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


def unique() -> str:
    """A suffix no other temporary on this host has.

    pid + counter (O_EXCL refuses a clash anyway): far cheaper than secrets.token_hex,
    which showed in the per-image profile. The pid is cached.
    """
    return f"{_PID}-{next(_COUNTER)}"


def replace_durably(
    final: str | os.PathLike[str], data: bytes | memoryview, mode: int, sync_folder: bool = True
) -> os.stat_result:
    """Temp file in the same folder, write, fsync, rename, fsync the folder.

    Plain ``os`` calls on strings: at thousands of images a second pathlib's overhead showed
    in the profile. The mode does not depend on the umask: the descriptor is fchmod-ed when
    the umask took bits away. ``sync_folder=False`` leaves the folder fsync to the caller
    (the image writers do one per batch).
    """
    folder, name = os.path.split(os.fspath(final))
    folder = folder or os.curdir  # a bare file name ("out.json") is in the current folder
    tmp = f"{folder}{os.sep}{TMP_PREFIX}{name}-{unique()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
            if os.fstat(fd).st_mode & 0o7777 != mode:
                os.fchmod(fd, mode)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # After the rename, which sets the ctime: the stat a later pass compares with.
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if sync_folder:
        fsync_dir(folder)
    return st


def remove_item_images(
    images_dir: str | os.PathLike[str],
    item_id: str,
    keep: str | os.PathLike[str] | None = None,
    exts: Iterable[str] = EXTENSIONS,
) -> list[str]:
    """Delete this item's images (those with an extension in ``exts``) but ``keep``; blocking.

    Returns the paths removed.
    """
    removed = []
    folder = os.fspath(images_dir)
    keep_name = os.path.basename(keep) if keep is not None else None
    for ext in exts:
        name = f"{item_id}.{ext}"
        if name == keep_name:
            continue
        # One unlink attempt per extension: cheaper than a stat and then an unlink.
        path = os.path.join(folder, name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def commit_bytes(
    final: str, data: bytes | memoryview, item_id: str, stale: Iterable[str], sync_folder: bool
) -> tuple[int, int, str]:
    """Hash, write durably, drop the stale extensions (blocking): (mtime_ns, ctime_ns, sha256).

    Called off the event loop: the hash chunk by chunk on the loop showed in the profile.
    """
    digest = hashlib.sha256(data).hexdigest()
    st = replace_durably(final, data, 0o644, sync_folder)
    if stale:
        remove_item_images(os.path.dirname(final), item_id, final, stale)
    return st.st_mtime_ns, st.st_ctime_ns, digest


class Batch:
    """Group commit, for both image writers: images written one by one, then one fsync
    per folder for all of them. An image is durable (its result final) only after
    ``sync``; a failed folder fsync fails every image of that folder."""

    def __init__(self) -> None:
        self.results: list[tuple[int, int, str] | Exception] = []
        self._folders: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.results)

    def write(
        self, final: str, data: bytes | memoryview, item_id: str, stale: Iterable[str]
    ) -> None:
        """Write one image (its folder not yet fsynced); an error becomes its result."""
        try:
            result = commit_bytes(final, data, item_id, stale, False)
        except Exception as exc:  # delivered to whoever waits for this image
            self.results.append(exc)
        else:
            self._folders.setdefault(os.path.dirname(final), []).append(len(self.results))
            self.results.append(result)

    def sync(self) -> list[tuple[int, int, str] | Exception]:
        """Fsync each folder once; the results, in the order written."""
        for folder, indexes in self._folders.items():
            try:
                fsync_dir(folder)
            except OSError as exc:
                for i in indexes:
                    self.results[i] = exc
        self._folders.clear()
        return self.results


# -- the image writer process ---------------------------------------------------------

REQUEST_HEAD: Final = "<IIII"  # struct format: request id, arena id, offset, body length
MAX_BATCH: Final = 64
MAX_PACKET: Final = 1 << 16  # a request: a path and an item id
MAX_ANSWER: Final = 1 << 16  # one packet of answers (a batch's may take several)


def _die_with_parent(parent: int) -> None:
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    except (OSError, AttributeError, ImportError) as exc:
        # serve() still checks its parent before each batch: a slower net, not none.
        sys.stderr.write(f"zoho-image-sync image writer: {exc}\n")
    if os.getppid() != parent:  # the daemon died before the prctl took hold
        raise SystemExit(0)
    # SCHED_BATCH: woken by a request, it does not preempt the event loop on that CPU; an
    # idle CPU takes it instead. Without it the two often shared one CPU and a pass took
    # 1.3 x as long (2 of 6 runs against 0 of 6 on the 2-core bench machine). The systemd
    # unit's syscall filter refuses it (EPERM): harmless at Zoho's 100 requests a minute.
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def serve(sock_fd: int, parent: int) -> None:
    """The image writer process: answer the daemon's requests until the socket ends."""
    import json
    import mmap
    import socket
    import struct

    _die_with_parent(parent)
    head = struct.Struct(REQUEST_HEAD)
    sock = socket.socket(fileno=sock_fd)
    arenas: dict[int, mmap.mmap] = {}

    def receive(flags: int) -> tuple[int, int, int, int, str, str, tuple[str, ...]] | None:
        # recvmsg, not socket.recv_fds: that one drops its flags argument in 3.11.
        msg, ancillary, _, _ = sock.recvmsg(MAX_PACKET, socket.CMSG_SPACE(4), flags)
        if not msg:
            return None
        rid, arena, offset, length = head.unpack_from(msg)
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fd = int.from_bytes(data[:4], sys.byteorder, signed=True)
                try:
                    arenas[arena] = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
                finally:
                    os.close(fd)
        final, item_id, stale = msg[head.size :].split(b"\0")
        exts = tuple(stale.decode().split(",")) if stale else ()
        return rid, arena, offset, length, os.fsdecode(final), item_id.decode(), exts

    batch = Batch()
    ids: list[int] = []

    def write(req: tuple[int, int, int, int, str, str, tuple[str, ...]]) -> None:
        rid, arena, offset, length, final, item_id, stale = req
        ids.append(rid)
        with memoryview(arenas[arena]) as whole, whole[offset : offset + length] as body:
            batch.write(final, body, item_id, stale)

    def answer() -> None:
        # One packet for the whole batch as a rule; split where escaped names make it big.
        packet: list[str] = []
        size = 2
        for rid, result in zip(ids, batch.sync(), strict=True):
            if isinstance(result, OSError):
                a = _failed(rid, result.errno, result.strerror, result.filename)
            elif isinstance(result, Exception):  # a bug: say so, not leave the daemon waiting
                a = _failed(rid, None, f"{type(result).__name__}: {result}", None)
            else:
                a = [rid, *result]
            text = json.dumps(a, separators=(",", ":"))
            if packet and size + len(text) + 1 > MAX_ANSWER:
                sock.send(f"[{','.join(packet)}]".encode())
                packet, size = [], 2
            packet.append(text)
            size += len(text) + 1
        sock.send(f"[{','.join(packet)}]".encode())

    ended = False
    while not ended:
        req = receive(0)
        if req is None or os.getppid() != parent:
            return  # the end of the socket, or the daemon is gone: write nothing more
        batch = Batch()
        ids.clear()
        write(req)
        # What arrives while one file is written joins the batch, one by one: a batch grows
        # as long as the daemon keeps sending, and shares one folder fsync and one answer.
        while len(batch) < MAX_BATCH:
            try:
                req = receive(socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if req is None:
                ended = True  # the daemon is done: answer this batch, then exit
                break
            if os.getppid() != parent:
                return  # the daemon is gone: write nothing more
            write(req)
        try:
            answer()
        except OSError:  # the daemon closed its end (it gave up on us, or is exiting)
            return


def _failed(rid: object, errno: int | None, text: str | None, filename: object) -> list[object]:
    # Bounded (JSON escapes may take 12 bytes a character): one answer always fits a packet.
    name = None if filename is None else os.fsdecode(filename)[-1024:]  # type: ignore[arg-type]
    return [rid, None, errno, (text or "")[:512], name]


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
