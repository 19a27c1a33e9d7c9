"""Real, decodable image bytes of a chosen size, built without an imaging library.

Each generator starts from a tiny valid image and pads it to the target size with data
that every decoder skips by design (JPEG COM segments, a private PNG chunk, GIF comment
extensions, an unknown WebP chunk), so the bytes open in Pillow or a browser while
costing no more CPU than ``random.randbytes``.
"""

from __future__ import annotations

import base64
import random
import struct
import zlib
from collections import OrderedDict

KINDS: tuple[str, ...] = ("jpg", "png", "gif", "webp")

CONTENT_TYPES: dict[str, str] = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "gif": "image/gif",
    "webp": "image/webp",
}

_KIND_ALIASES = {"jpeg": "jpg", "jpg": "jpg", "png": "png", "gif": "gif", "webp": "webp"}

# A 32x24 baseline JFIF (Pillow, quality 75). Bytes 0..19 are SOI + the APP0/JFIF segment;
# padding goes right after them, since JFIF requires APP0 to follow SOI directly.
_JPEG_BASE = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAgGBgcGBQgHBwcJCQgKDBQNDAsLDBkSEw8UHRofHh0aHBwgJC4n"
    "ICIsIxwcKDcpLDAxNDQ0Hyc5PTgyPC4zNDL/2wBDAQkJCQwLDBgNDRgyIRwhMjIyMjIyMjIyMjIyMjIyMjIy"
    "MjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjL/wAARCAAYACADASIAAhEBAxEB/8QAHwAAAQUBAQEB"
    "AQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAAAgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEGE1FhByJxFDKB"
    "kaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1"
    "dnd4eXqDhIWGh4iJipKTlJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXGx8jJytLT1NXW19jZ2uHi4+Tl"
    "5ufo6erx8vP09fb3+Pn6/8QAHwEAAwEBAQEBAQEBAQAAAAAAAAECAwQFBgcICQoL/8QAtREAAgECBAQDBAcF"
    "BAQAAQJ3AAECAxEEBSExBhJBUQdhcRMiMoEIFEKRobHBCSMzUvAVYnLRChYkNOEl8RcYGRomJygpKjU2Nzg5"
    "OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6goOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0"
    "tba3uLm6wsPExcbHyMnK0tPU1dbX2Nna4uPk5ebn6Onq8vP09fb3+Pn6/9oADAMBAAIRAxEAPwDy+DTdmPl/"
    "+tWnBpuzHy//AFq3INN2Y+X/AOtWnBpuzHy//Wr6yrjbdbW/D/O/4flw5fmO2piQabsx8v8A9atODTdmPl/+"
    "tW5BpuzHy/8A1q04NN2Y+X/61eZVxtutrfh/nf8AD8vucvzHbUqQabsx8v8A9atODTdmPl/+tRRXl4irKHNb"
    "7Ox+KZdXnpqakGm7MfL/APWrTg03Zj5f/rUUV5mIqyhzW+zsfc5dXnpqf//Z"
)
_JPEG_HEAD = _JPEG_BASE[:20]
_JPEG_TAIL = _JPEG_BASE[20:]
_JPEG_COM_MAX = 0xFFFF - 2  # a segment length counts its own two bytes

# 1x1 GIF89a: header, screen descriptor, 2-colour table, then the image (GCE, descriptor,
# LZW data, trailer). Comment extensions go between the colour table and the image.
_GIF_HEAD = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00"
_GIF_TAIL = b"!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"

# VP8L payload of a 16x16 lossless image (Pillow/libwebp), wrapped in the extended
# (VP8X) layout because only that layout allows extra, unknown chunks.
_VP8L_16 = bytes.fromhex("2f0fc0030007509e22d7a3ff8188e87f00")
_WEBP_SIZE = 16

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_WIDTH = 256
_PNG_ROW = 1 + 3 * _PNG_WIDTH  # filter byte + RGB


def normalise_kind(kind: str) -> str:
    """Map "jpeg"/"JPG"/... to one of KINDS, or raise ValueError."""
    try:
        return _KIND_ALIASES[kind.lower()]
    except KeyError:
        raise ValueError(f"unknown image kind {kind!r}; expected one of {KINDS}") from None


def min_size(kind: str) -> int:
    """The smallest image this module can make of that kind."""
    kind = normalise_kind(kind)
    if kind == "jpg":
        return len(_JPEG_BASE)
    if kind == "png":
        return len(_PNG_SIGNATURE) + 25 + 3 * 12 + len(zlib.compress(bytes(_PNG_ROW), 0))
    if kind == "gif":
        return len(_GIF_HEAD) + len(_GIF_TAIL)
    return 12 + 18 + 8 + len(_VP8L_16) + (len(_VP8L_16) & 1)


def sniff(data: bytes) -> str | None:
    """The image kind named by the magic number at the start of data, if any."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def render(kind: str, size: int, key: str) -> bytes:
    """A valid image of the given kind, about size bytes, deterministic in key."""
    kind = normalise_kind(kind)
    rng = random.Random(f"{kind}:{size}:{key}")
    if kind == "jpg":
        return _jpeg(size, rng)
    if kind == "png":
        return _png(size, rng)
    if kind == "gif":
        return _gif(size, rng)
    return _webp(size, rng)


def _jpeg(size: int, rng: random.Random) -> bytes:
    pad = size - len(_JPEG_BASE)
    if pad < 4:
        # No room for even one COM segment: the bare (valid, but not unique) image.
        return _JPEG_BASE
    count = -(-pad // (_JPEG_COM_MAX + 4))
    payload = rng.randbytes(pad - 4 * count)
    parts = [_JPEG_HEAD]
    start = 0
    for index in range(count):
        length = len(payload) // count + (1 if index < len(payload) % count else 0)
        parts.append(b"\xff\xfe" + struct.pack(">H", length + 2))
        parts.append(payload[start : start + length])
        start += length
    parts.append(_JPEG_TAIL)
    return b"".join(parts)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png(size: int, rng: random.Random) -> bytes:
    fixed = len(_PNG_SIGNATURE) + 25 + 12 + 12 + 12  # IHDR, IDAT, pad chunk, IEND
    height = max(1, (size - fixed) // (_PNG_ROW + 1))
    while True:
        raw = bytearray(rng.randbytes(height * _PNG_ROW))
        raw[0::_PNG_ROW] = bytes(height)  # filter type 0 (None) on every row
        idat = zlib.compress(bytes(raw), 0)
        pad = size - fixed - len(idat)
        if pad >= 0 or height == 1:
            break
        height = max(1, height - 1 - (-pad // _PNG_ROW))
    ihdr = struct.pack(">IIBBBBB", _PNG_WIDTH, height, 8, 2, 0, 0, 0)
    return b"".join(
        (
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", ihdr),
            # Private ancillary, safe-to-copy chunk: decoders skip it.
            _png_chunk(b"prVt", rng.randbytes(max(0, pad))),
            _png_chunk(b"IDAT", idat),
            _png_chunk(b"IEND", b""),
        )
    )


def _gif(size: int, rng: random.Random) -> bytes:
    room = size - len(_GIF_HEAD) - len(_GIF_TAIL) - 3  # 0x21 0xFE ... 0x00
    if room < 2:
        return _GIF_HEAD + _GIF_TAIL
    blocks = -(-room // 256)
    payload = rng.randbytes(room - blocks)
    parts = [_GIF_HEAD, b"!\xfe"]
    start = 0
    for index in range(blocks):
        length = len(payload) // blocks + (1 if index < len(payload) % blocks else 0)
        parts.append(bytes((length,)))
        parts.append(payload[start : start + length])
        start += length
    parts.append(b"\x00")
    parts.append(_GIF_TAIL)
    return b"".join(parts)


def _riff_chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + (b"\x00" if len(data) & 1 else b"")


def _webp(size: int, rng: random.Random) -> bytes:
    dims = (_WEBP_SIZE - 1).to_bytes(3, "little") * 2
    body = _riff_chunk(b"VP8X", b"\x00\x00\x00\x00" + dims) + _riff_chunk(b"VP8L", _VP8L_16)
    room = size - 12 - len(body) - 8
    room -= room & 1  # RIFF pads odd chunks: stay at or under size
    if room >= 0:
        body += _riff_chunk(b"SIMP", rng.randbytes(room))
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


class ImageCache:
    """A small LRU of rendered images, so repeated downloads cost no CPU."""

    def __init__(self, maxsize: int = 64) -> None:
        self._maxsize = maxsize
        self._entries: OrderedDict[tuple[str, int, str], bytes] = OrderedDict()

    def get(self, kind: str, size: int, key: str) -> bytes:
        """The rendered image, from the cache when it was made recently."""
        cache_key = (kind, size, key)
        data = self._entries.get(cache_key)
        if data is not None:
            self._entries.move_to_end(cache_key)
            return data
        data = render(kind, size, key)
        self._entries[cache_key] = data
        if len(self._entries) > self._maxsize:
            self._entries.popitem(last=False)
        return data
