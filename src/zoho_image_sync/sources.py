"""The exported items file (``source.kind = "file"``), read as a stream.

The ERP's export is one JSON array. It is decoded object by object from 1 MiB reads,
so a 100 MB file needs a few MB of memory, and handed on in pages like the API's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import structlog

from .errors import ConfigError
from .pager import PER_PAGE, CatalogueItem, Pages

log = structlog.get_logger(__name__)

READ_BYTES: Final = 1 << 20
_WS: Final = " \t\r\n"


class ItemsFileError(ConfigError):
    """The items file is not a JSON array of objects."""


def iter_json_array(path: Path, read_bytes: int = READ_BYTES) -> Iterator[Any]:
    """Yield the elements of the JSON array in ``path`` one at a time."""
    decoder = json.JSONDecoder()
    try:
        f = path.open("r", encoding="utf-8-sig")  # a BOM (Windows tools) is dropped
    except OSError as exc:
        raise ItemsFileError("source.items_file", f"cannot open {path}: {exc.strerror}") from None
    with f:
        buf = ""
        pos = 0
        eof = False

        def fill() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            try:
                chunk = f.read(read_bytes)
            except UnicodeDecodeError:
                raise ItemsFileError("source.items_file", f"{path} is not UTF-8") from None
            if not chunk:
                eof = True
                return False
            buf = buf[pos:] + chunk
            pos = 0
            return True

        def skip_ws() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in _WS:
                    pos += 1
                if pos < len(buf) or not fill():
                    return

        skip_ws()
        if pos >= len(buf) or buf[pos] != "[":
            raise ItemsFileError("source.items_file", f"{path} must hold a JSON array")
        pos += 1
        skip_ws()
        if pos < len(buf) and buf[pos] == "]":
            return
        index = 0
        while True:
            skip_ws()
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as exc:
                    if not fill():
                        raise ItemsFileError(
                            "source.items_file",
                            f"{path}: element {index} is not valid JSON ({exc.msg})",
                        ) from None
                except (ValueError, RecursionError) as exc:  # huge numbers, deep nesting
                    raise ItemsFileError(
                        "source.items_file", f"{path}: element {index} cannot be read ({exc})"
                    ) from None
            pos = end
            yield value
            index += 1
            skip_ws()
            if pos >= len(buf):
                raise ItemsFileError("source.items_file", f"{path}: the array is not closed")
            if buf[pos] == ",":
                pos += 1
            elif buf[pos] == "]":
                return
            else:
                raise ItemsFileError(
                    "source.items_file", f"{path}: expected ',' or ']' after element {index - 1}"
                )


async def file_pages(path: Path) -> Pages:
    """The items file in pages of 200, like the API (decoding is cheap; no thread hop)."""
    page: list[CatalogueItem] = []
    number = 0
    for index, raw in enumerate(iter_json_array(path)):
        if isinstance(raw, dict):
            page.append(CatalogueItem.from_zoho(raw))
        else:
            log.warning("items file entry is not an object; skipped", index=index)
            page.append(CatalogueItem(item_id=""))
        if len(page) == PER_PAGE:
            number += 1
            yield number, page
            page = []
    if page or number == 0:
        yield number + 1, page
