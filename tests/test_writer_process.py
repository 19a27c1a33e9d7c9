"""The image writer process: a real child process, real signals, real files."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from conftest import (
    SMALL,
    SimFactory,
    assert_folder_matches_state,
    assert_mirror,
    run_once,
    stop_with_writes_held,
)
from zoho_image_sync import durable
from zoho_image_sync.service import Service
from zoho_image_sync.storage import TMP_PREFIX, Committed, ProcessImageWriter

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="Linux only")


def _jpeg(n: int) -> bytes:
    return b"\xff\xd8\xff" + os.urandom(n)


async def _running(folder: Path) -> tuple[ProcessImageWriter, int]:
    """A writer whose process is up (it answered a first image)."""
    writer = ProcessImageWriter()
    writer.start()
    await writer.submit(folder / "first.jpg", _jpeg(100), "first", ())
    assert writer.pid is not None and writer.pid != os.getpid()
    return writer, writer.pid


def _gone_within(pid_fd: int, seconds: float) -> bool:
    readable, _, _ = select.select([pid_fd], [], [], seconds)
    return bool(readable)


def _check(folder: Path, bodies: dict[str, bytes], results: list[Committed]) -> None:
    for (item_id, body), (mtime_ns, ctime_ns, digest) in zip(bodies.items(), results, strict=True):
        path = folder / f"{item_id}.jpg"
        assert path.read_bytes() == body, item_id
        assert digest == hashlib.sha256(body).hexdigest()
        st = path.stat()
        assert (mtime_ns, ctime_ns) == (st.st_mtime_ns, st.st_ctime_ns)
        assert path.stat().st_mode & 0o777 == 0o644


async def test_it_writes_each_image_durably_with_its_hash_and_mode(tmp_path: Path) -> None:
    (tmp_path / "7.png").write_bytes(b"old")  # a stale extension of item 7
    old = os.umask(0o077)  # the process starts under it: the mode must not depend on it
    try:
        writer, pid = await _running(tmp_path)
    finally:
        os.umask(old)
    bodies = {str(i): _jpeg(5_000 + 37 * i) for i in range(40)}
    futures = [
        writer.submit(tmp_path / f"{i}.jpg", body, i, ("png",) if i == "7" else ())
        for i, body in bodies.items()
    ]
    results = await asyncio.gather(*futures)
    assert writer.pid == pid  # all of them in the one process, none in a thread
    assert os.sched_getscheduler(pid) == os.SCHED_BATCH  # it never preempts the loop
    assert await writer.aclose()
    _check(tmp_path, bodies, results)
    assert not (tmp_path / "7.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
    with pytest.raises(ProcessLookupError):  # it exited, and it was reaped
        os.pidfd_open(pid)


async def test_a_failed_write_fails_only_its_own_image(tmp_path: Path) -> None:
    writer, _ = await _running(tmp_path)
    good = [writer.submit(tmp_path / f"{i}.jpg", _jpeg(500), str(i), ()) for i in range(3)]
    bad = writer.submit(tmp_path / "missing" / "9.jpg", _jpeg(500), "9", ())
    assert len(await asyncio.gather(*good)) == 3
    with pytest.raises(FileNotFoundError) as caught:
        await bad
    assert str(tmp_path / "missing") in str(caught.value.filename)
    assert await writer.aclose()


async def test_a_killed_process_loses_no_image(tmp_path: Path) -> None:
    writer, pid = await _running(tmp_path)
    os.kill(pid, signal.SIGSTOP)  # what it is sent from now on stays unanswered
    bodies = {str(i): _jpeg(20_000 + i) for i in range(12)}
    futures = [writer.submit(tmp_path / f"{i}.jpg", b, i, ()) for i, b in bodies.items()]
    assert not any(f.done() for f in futures)
    with capture_logs() as logs:
        os.kill(pid, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*futures), 10)
        later = {"late": _jpeg(3_000)}
        results.append(await writer.submit(tmp_path / "late.jpg", later["late"], "late", ()))
        assert await writer.aclose()
    _check(tmp_path, bodies | later, results)
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "image writer process failed; writing in a thread"
    ]
    ended = [e for e in logs if e["event"] == "image writer process ended"]
    assert [e["exit_status"] for e in ended] == [-signal.SIGKILL]


async def test_a_stuck_process_does_not_hold_close_past_its_deadline(tmp_path: Path) -> None:
    writer, pid = await _running(tmp_path)
    os.kill(pid, signal.SIGSTOP)
    try:
        bodies = {str(i): _jpeg(8_000 + i) for i in range(4)}
        futures = [writer.submit(tmp_path / f"{i}.jpg", b, i, ()) for i, b in bodies.items()]
        assert not await asyncio.wait_for(writer.aclose(wait_at_most=0.2), 5)
        assert not any(f.done() for f in futures)
    finally:
        os.kill(pid, signal.SIGCONT)
    # Once it moves, the late answers still arrive, and a second close sees it exit.
    _check(tmp_path, bodies, await asyncio.wait_for(asyncio.gather(*futures), 10))
    assert await asyncio.wait_for(writer.aclose(), 10)
    with pytest.raises(ProcessLookupError):
        os.pidfd_open(pid)


async def test_it_ignores_the_signals_meant_for_the_daemon(tmp_path: Path) -> None:
    # A Ctrl-C reaches the whole process group: the daemon drains, its writer must not die.
    writer, pid = await _running(tmp_path)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        os.kill(pid, sig)
    bodies = {str(i): _jpeg(1_000 + i) for i in range(5)}
    with capture_logs() as logs:
        futures = [writer.submit(tmp_path / f"{i}.jpg", b, i, ()) for i, b in bodies.items()]
        _check(tmp_path, bodies, await asyncio.gather(*futures))
    assert writer.pid == pid and not logs
    assert await writer.aclose()


async def test_it_gets_no_secret_and_no_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZOHO_CLIENT_SECRET", "hush-0123456789")
    writer, pid = await _running(tmp_path)
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert [v.split(b"=")[0] for v in environ if v] == [b"PATH"]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"hush" not in environ and b"hush" not in cmdline
    # Nothing of the daemon's open files either (state lock, token cache, sockets): its
    # standard streams, its socket (the fd named on its command line) and the shared
    # memory it was sent (one arena so far).
    sock_fd = cmdline.split(b"\0")[-3].decode()
    fds = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    others = {fd: target for fd, target in fds.items() if fd not in ("0", "1", "2", sock_fd)}
    assert list(others.values()) == ["/memfd:zis-images-0 (deleted)"], fds
    assert await writer.aclose()


async def test_it_dies_with_the_daemon_and_writes_nothing_after(tmp_path: Path) -> None:
    # SIGKILL leaves the daemon no time to close anything. Its writer must not go on with
    # what it was sent: a write after the daemon's death could race the next start's sweep.
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from zoho_image_sync.storage import ProcessImageWriter
        body = b"\\xff\\xd8\\xff" + b"x" * 1000
        async def main():
            w = ProcessImageWriter(); w.start()
            await w.submit({str(tmp_path / "a.jpg")!r}, body, "a", ())
            print(w.pid, flush=True)
            await asyncio.to_thread(sys.stdin.readline)
            for i in range(5):
                w.submit({str(tmp_path)!r} + f"/b{{i}}.jpg", body, f"b{{i}}", ())
            print("sent", flush=True)
            await asyncio.Event().wait()
        asyncio.run(main())
        """
    )
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert daemon.stdin is not None and daemon.stdout is not None
    try:
        pid = int(await asyncio.wait_for(daemon.stdout.readline(), 20))
        pid_fd = os.pidfd_open(pid)
        try:
            os.kill(pid, signal.SIGSTOP)  # the next five requests wait in its socket
            daemon.stdin.write(b"go\n")
            await daemon.stdin.drain()
            assert await asyncio.wait_for(daemon.stdout.readline(), 20) == b"sent\n"
            daemon.kill()
            await asyncio.wait_for(daemon.wait(), 10)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # were it alive, it would now write them
            assert await asyncio.to_thread(_gone_within, pid_fd, 10)
        finally:
            os.close(pid_fd)
    finally:
        if daemon.returncode is None:
            daemon.kill()
            await daemon.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg"]


class _Spawned:
    """Catches the pass's writer process as it starts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pid = 0
        self.writer: ProcessImageWriter | None = None
        self.started = asyncio.Event()
        real = ProcessImageWriter._spawn

        def spawn(writer: ProcessImageWriter) -> None:
            real(writer)
            assert writer.pid is not None
            self.pid, self.writer = writer.pid, writer
            os.kill(self.pid, signal.SIGSTOP)  # held: what it is sent stays unanswered
            self.started.set()

        monkeypatch.setattr(ProcessImageWriter, "_spawn", spawn)


async def test_a_pass_whose_writer_process_is_killed_loses_nothing(
    make_sim: SimFactory, make_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned = _Spawned(monkeypatch)
    sim = await make_sim(**SMALL)
    cfg = make_config(sim, download={"workers": 2})
    task = asyncio.create_task(run_once(cfg))
    await asyncio.wait_for(spawned.started.wait(), 10)
    await asyncio.wait_for(sim.wait_api_requests(1 + 4), 10)  # two bodies per worker held
    os.kill(spawned.pid, signal.SIGKILL)
    report, code = await asyncio.wait_for(task, 30)
    assert code == 0 and report["statistics"]["images_downloaded"] == 120
    assert_mirror(sim, cfg.storage.images_dir)
    assert_folder_matches_state(cfg.storage.images_dir, cfg.storage.state_file)


async def test_a_stuck_writer_process_does_not_hold_a_stop_past_its_deadline(
    make_sim: SimFactory, make_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned = _Spawned(monkeypatch)
    sim = await make_sim(**SMALL)
    cfg = make_config(sim, download={"workers": 2}, sync={"shutdown_timeout_seconds": 0.5})
    service = Service(cfg)
    task = asyncio.create_task(service.once())
    try:
        await asyncio.wait_for(spawned.started.wait(), 10)
        await stop_with_writes_held(service, task, sim)
    finally:
        os.kill(spawned.pid, signal.SIGCONT)
    # It then writes what it holds, and a second close sees it end (its socket closed).
    assert spawned.writer is not None
    assert await asyncio.wait_for(spawned.writer.aclose(), 10)


@pytest.mark.parametrize(
    "answer",
    [b"[[12345, 1, 2]]", b"[[0, 1]]", b"[[0, null]]", b'[[0, "x", 2]]', b"not json"],
    ids=["unknown id", "short", "short error", "bad mtime", "not json"],
)
async def test_a_garbled_answer_hands_its_images_to_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: bytes
) -> None:
    # A process that answers nonsense (a bug, a version mix-up) must not leave a worker
    # waiting forever: its images are written by the thread, and it is killed.
    fake = tmp_path / "fake_writer.py"
    fake.write_text(
        textwrap.dedent(
            f"""
            import socket, sys
            sock = socket.socket(fileno=int(sys.argv[1]))
            sock.recvmsg(1 << 16, socket.CMSG_SPACE(4))
            sock.send({answer!r})
            while sock.recv(1 << 16):  # until the daemon closes its end (or kills it)
                pass
            """
        )
    )
    monkeypatch.setattr(durable, "__file__", str(fake))
    out = tmp_path / "out"
    out.mkdir()
    writer = ProcessImageWriter()
    writer.start()
    body = _jpeg(4_000)
    with capture_logs() as logs:
        result = await asyncio.wait_for(writer.submit(out / "1.jpg", body, "1", ()), 10)
        assert await asyncio.wait_for(writer.aclose(), 10)
    assert "unreadable answer" in next(e["why"] for e in logs if e["log_level"] == "error")
    assert [e["exit_status"] for e in logs if e["event"] == "image writer process ended"] == [
        -signal.SIGKILL
    ]
    _check(out, {"1": body}, [result])


async def test_a_full_socket_waits_for_room_and_is_no_failure(tmp_path: Path) -> None:
    # Hundreds of workers and a slow disk: more requests than the socket holds. They wait
    # in order for room; the process is not given up for it, and close waits for them.
    writer, pid = await _running(tmp_path)
    assert writer._sock is not None
    writer._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # whatever the host's
    os.kill(pid, signal.SIGSTOP)
    try:
        bodies = {str(i): _jpeg(200 + i) for i in range(100)}
        futures = [writer.submit(tmp_path / f"{i}.jpg", b, i, ()) for i, b in bodies.items()]
        assert writer._waiting_for_room  # the socket is full: the case under test
    finally:
        os.kill(pid, signal.SIGCONT)
    with capture_logs() as logs:
        assert await asyncio.wait_for(writer.aclose(), 30)  # before any answer was read
    assert not logs
    _check(tmp_path, bodies, [f.result() for f in futures])


async def test_it_fsyncs_each_file_and_each_folder_once_per_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real serve loop in a real process, its fsync calls recorded by a wrapper.
    record = tmp_path / "fsyncs.txt"
    wrapper = tmp_path / "counting_writer.py"
    wrapper.write_text(
        textwrap.dedent(
            f"""
            import os, runpy, stat, sys
            real = os.fsync
            def fsync(fd):
                real(fd)
                kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
                with open({str(record)!r}, "a") as f:
                    f.write(kind + " " + os.readlink(f"/proc/self/fd/{{fd}}") + "\\n")
            os.fsync = fsync
            sys.argv[0] = {durable.__file__!r}
            runpy.run_path({durable.__file__!r}, run_name="__main__")
            """
        )
    )
    monkeypatch.setattr(durable, "__file__", str(wrapper))
    out = tmp_path / "out"
    out.mkdir()
    writer, pid = await _running(out)  # one image: a batch of one
    os.kill(pid, signal.SIGSTOP)
    try:
        bodies = {str(i): _jpeg(3_000 + i) for i in range(40)}
        futures = [writer.submit(out / f"{i}.jpg", b, i, ()) for i, b in bodies.items()]
    finally:
        os.kill(pid, signal.SIGCONT)  # all 40 are waiting: one batch
    _check(out, bodies, await asyncio.wait_for(asyncio.gather(*futures), 10))
    assert await writer.aclose()
    lines = record.read_text().splitlines()
    files = [line for line in lines if line.startswith("file ")]
    assert len(files) == 41
    assert all(Path(line[5:]).name.startswith(TMP_PREFIX) for line in files)  # before rename
    assert [line for line in lines if line.startswith("dir ")] == [f"dir {out}"] * 2
    assert lines[1] == f"dir {out}" and lines[-1] == f"dir {out}"  # after each batch's files


async def test_no_process_means_a_thread_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    writer = ProcessImageWriter()
    writer.start()
    bodies = {str(i): _jpeg(2_000 + i) for i in range(3)}
    with capture_logs() as logs:
        futures = [writer.submit(tmp_path / f"{i}.jpg", b, i, ()) for i, b in bodies.items()]
        _check(tmp_path, bodies, await asyncio.gather(*futures))
    assert writer.pid is None
    assert [e["event"] for e in logs] == ["image writer process did not start; writing in a thread"]
    assert await writer.aclose()


async def test_no_shared_memory_means_a_thread_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first arena (16 slots) exists; a 17th image in flight needs another memfd, and
    # there is none (EMFILE, a seccomp filter): the thread takes everything, nothing fails.
    writer, pid = await _running(tmp_path)
    os.kill(pid, signal.SIGSTOP)

    def no_memfd(*_: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    try:
        monkeypatch.setattr(os, "memfd_create", no_memfd)
        bodies = {str(i): _jpeg(1_000 + i) for i in range(20)}
        with capture_logs() as logs:
            futures = [writer.submit(tmp_path / f"{i}.jpg", b, i, ()) for i, b in bodies.items()]
    finally:
        os.kill(pid, signal.SIGCONT)
    _check(tmp_path, bodies, await asyncio.wait_for(asyncio.gather(*futures), 10))
    assert "no shared memory" in next(e["why"] for e in logs if e["log_level"] == "error")
    assert await writer.aclose()


async def test_a_batch_of_long_failures_is_answered_in_several_packets(tmp_path: Path) -> None:
    # 64 failures whose names JSON escapes to ~2 KB each: more than one packet can hold.
    writer, pid = await _running(tmp_path)
    missing = tmp_path / ("é" * 120) / ("ü" * 120)
    os.kill(pid, signal.SIGSTOP)
    try:
        futures = [writer.submit(missing / f"{i}.jpg", _jpeg(100), str(i), ()) for i in range(64)]
    finally:
        os.kill(pid, signal.SIGCONT)  # all 64 in one batch
    with capture_logs() as logs:
        errors = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(e, FileNotFoundError) for e in errors), errors[:2]
    assert all(str(missing) in str(e.filename) for e in errors if isinstance(e, OSError))
    assert writer.pid == pid and not logs  # no failure of the process for it
    assert await writer.aclose()
