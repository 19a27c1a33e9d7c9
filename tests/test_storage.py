"""Atomic files, magic numbers and item ids."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zoho_image_sync.storage import (
    TMP_PREFIX,
    ImageSink,
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


def test_atomic_write_mode_and_no_leftover(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"
    write_bytes_atomic(target, b"{}", mode=0o600)
    assert target.read_bytes() == b"{}"
    assert (target.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


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
    final = await sink.commit("jpg")
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
            final = await sink.commit("jpg")
            modes.append(final.stat().st_mode & 0o777)
    finally:
        os.umask(old)
    assert modes == [0o644, 0o644]
