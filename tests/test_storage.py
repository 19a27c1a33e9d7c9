"""Atomic files, magic numbers and item ids."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import StuckDisk
from zoho_image_sync import durable
from zoho_image_sync.storage import (
    ITEM_ID_RE,
    TMP_PREFIX,
    ImageSink,
    ImageWriter,
    sniff_image,
    sweep_temporaries,
    valid_item_id,
    write_bytes_atomic,
)


@pytest.mark.parametrize(
    ("head", "ext"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "jpg"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "png"),
        (b"GIF89a\x01\x00\x01\x00", "gif"),
        (b"GIF87a\x01\x00\x01\x00", "gif"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "webp"),
        (b"BM\x36\x00\x00\x00\x00\x00\x00\x00\x36\x00", "bmp"),
        (b"BMW is a car maker", None),
        (b'{"code": 1002}', None),
        (b"<!DOCTYPE html>", None),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", None),
        (b"", None),
    ],
)
def test_sniff(head: bytes, ext: str | None) -> None:
    assert sniff_image(head) == ext


@pytest.mark.parametrize(
    "bad", ["", "../../x", "a/b", "..", ".", "a" * 65, "a\x00b", "a b", "é", "a.jpg", "\\x"]
)
def test_hostile_ids_refused(bad: str) -> None:
    assert not valid_item_id(bad)


@given(st.text(min_size=0, max_size=80))
def test_valid_ids_are_plain_file_names(item_id: str) -> None:
    if valid_item_id(item_id):
        assert "/" not in item_id and item_id not in (".", "..")
        assert Path(item_id).name == item_id
        assert 1 <= len(item_id) <= 64


@given(st.from_regex(ITEM_ID_RE, fullmatch=True))
def test_every_id_of_the_pattern_is_valid_and_a_plain_file_name(item_id: str) -> None:
    assert valid_item_id(item_id)
    assert "/" not in item_id and "\\" not in item_id and item_id not in (".", "..")
    assert Path(item_id).name == item_id and not item_id.startswith(".")
    assert 1 <= len(item_id) <= 64


def test_atomic_write_mode_and_no_leftover(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"
    write_bytes_atomic(target, b"{}", mode=0o600)
    assert target.read_bytes() == b"{}"
    assert (target.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


@pytest.mark.parametrize("failing", ["write", "fsync", "fchmod", "replace"])
def test_a_failed_durable_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    final = tmp_path / "7.jpg"
    final.write_bytes(b"old")

    def broken(*_args: object) -> None:
        raise OSError(5, f"{failing} failed (injected)")

    monkeypatch.setattr(os, failing, broken)  # durable.py calls os.* at call time
    fds = set(os.listdir("/proc/self/fd"))
    umask = os.umask(0o077)  # takes bits from 0o644: the fchmod runs
    try:
        with pytest.raises(OSError, match="injected"):
            durable.replace_durably(final, b"new bytes", 0o644)
    finally:
        os.umask(umask)
        monkeypatch.undo()
    assert final.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["7.jpg"]
    assert set(os.listdir("/proc/self/fd")) == fds  # the descriptor was closed


def test_sweep_removes_only_temporaries(tmp_path: Path) -> None:
    (tmp_path / f"{TMP_PREFIX}1-abcd").write_bytes(b"partial")
    (tmp_path / "1.jpg").write_bytes(b"x")
    assert sweep_temporaries(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["1.jpg"]


async def test_sink_spills_large_bodies_and_commits(tmp_path: Path) -> None:
    sink = ImageSink(tmp_path, "42", spill_bytes=1000)
    data = b"\xff\xd8\xff" + os.urandom(5000)
    for i in range(0, len(data), 700):
        await sink.write(data[i : i + 700])
    assert any(p.name.startswith(TMP_PREFIX) for p in tmp_path.iterdir())
    (tmp_path / "42.png").write_bytes(b"old image of another type")
    final = Path(await sink.commit("jpg"))
    assert final == tmp_path / "42.jpg"
    assert final.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["42.jpg"]


async def test_sink_discard_leaves_nothing(tmp_path: Path) -> None:
    sink = ImageSink(tmp_path, "7", spill_bytes=10)
    await sink.write(b"0123456789abcdef")
    await sink.discard()
    assert list(tmp_path.iterdir()) == []


async def test_small_and_spilled_images_get_the_same_mode(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        modes = []
        for name, size in (("small", 500), ("large", 5000)):
            sink = ImageSink(tmp_path, name, spill_bytes=1000)
            await sink.write(b"\xff\xd8\xff" + os.urandom(size))
            final = Path(await sink.commit("jpg"))
            modes.append(final.stat().st_mode & 0o777)
    finally:
        os.umask(old)
    assert modes == [0o644, 0o644]


def _jpeg(n: int) -> bytes:
    return b"\xff\xd8\xff" + os.urandom(n)


async def test_writer_group_commits_one_folder_fsync_per_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stuck_disk: StuckDisk
) -> None:
    # The first write is held until 39 more are queued: they must go out as one batch,
    # with one folder fsync and one loop wake-up, and every file exact.
    real_fsync = durable.fsync_dir
    fsyncs: list[Path] = []  # the writer passes folder names as strings

    def counted_fsync(folder: Path | str) -> None:
        fsyncs.append(Path(folder))
        real_fsync(folder)

    monkeypatch.setattr(durable, "fsync_dir", counted_fsync)
    (tmp_path / "3.png").write_bytes(b"stale image of another type")
    writer = ImageWriter()
    writer.start()
    bodies = {str(i): _jpeg(1000 + i) for i in range(40)}
    submit = [(tmp_path / f"{i}.jpg", body, i, ("png", "gif")) for i, body in bodies.items()]
    futures = [writer.submit(*submit[0])]
    assert await asyncio.to_thread(stuck_disk.entered.wait, 10)  # it holds the first write
    futures += [writer.submit(*args) for args in submit[1:]]
    stuck_disk.release.set()
    results = await asyncio.gather(*futures)
    await writer.aclose()
    assert fsyncs == [tmp_path, tmp_path]  # batch of 1 (held), then the other 39 together
    for (item_id, body), (mtime_ns, ctime_ns, digest) in zip(bodies.items(), results, strict=True):
        path = tmp_path / f"{item_id}.jpg"
        assert path.read_bytes() == body
        assert digest == hashlib.sha256(body).hexdigest()
        st = path.stat()
        assert (mtime_ns, ctime_ns) == (st.st_mtime_ns, st.st_ctime_ns)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{i}.jpg" for i in bodies)


async def test_writer_fails_only_the_bad_request_of_a_batch(tmp_path: Path) -> None:
    writer = ImageWriter()
    writer.start()
    good = [writer.submit(tmp_path / f"{i}.jpg", _jpeg(500), str(i), ()) for i in range(3)]
    bad = writer.submit(tmp_path / "missing" / "9.jpg", _jpeg(500), "9", ())
    with pytest.raises(FileNotFoundError):
        await bad
    assert len(await asyncio.gather(*good)) == 3
    await writer.aclose()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.jpg", "1.jpg", "2.jpg"]


async def test_writer_close_finishes_queued_work_and_survives_cancelled_waiters(
    tmp_path: Path,
) -> None:
    writer = ImageWriter()
    writer.start()
    futures = [writer.submit(tmp_path / f"{i}.jpg", _jpeg(2000), str(i), ()) for i in range(20)]
    futures[5].cancel()  # its worker gave up waiting (shutdown deadline): no error on delivery
    await writer.aclose()
    await asyncio.gather(*futures, return_exceptions=True)
    assert [f.cancelled() for f in futures].count(True) == 1
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(f"{i}.jpg" for i in range(20))  # written anyway, no temporary
    with pytest.raises(RuntimeError, match="before start"):
        writer.submit(tmp_path / "x.jpg", b"", "x", ())


async def test_writer_sets_the_mode_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        writer = ImageWriter()
        writer.start()
        await writer.submit(tmp_path / "1.jpg", _jpeg(100), "1", ())
        await writer.aclose()
    finally:
        os.umask(old)
    assert (tmp_path / "1.jpg").stat().st_mode & 0o777 == 0o644
