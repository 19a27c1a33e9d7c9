"""A reference, not a contender: how fast aiohttp alone fetches the images here.

The same event loop (uvloop where installed), the same library and the same number of
connections as zoho-image-sync, but nothing else: no token, no paging, no rate gate, no
state, no metrics, no logging, and the bodies are read and dropped (no hash, no file).
The gap between this row and zoho-image-sync is the cost of the daemon's own work per
image; the gap between this row and aria2c is the cost of Python and aiohttp. Prints one
JSON line: ``{"images", "bytes"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import urllib.parse
from pathlib import Path

import aiohttp

from zoho_image_sync.loop import run as run_loop


async def fetch_all(urls: list[str], header: str, workers: int) -> tuple[int, int]:
    """GET every URL over ``workers`` keep-alive connections; (images, bytes) received."""
    todo = iter(urls)
    totals = [0, 0]
    headers = {"Authorization": header}
    connector = aiohttp.TCPConnector(limit=workers)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for url in todo:
                async with session.get(url, headers=headers) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status} for {url}")
                    body = await resp.read()
                totals[0] += 1
                totals[1] += len(body)

        await asyncio.gather(*(worker() for _ in range(workers)))
    return totals[0], totals[1]


def main() -> int:
    """Entry point: ``python -m bench.aioclient BASE IDS_FILE HEADER [--workers N]``."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("base", help="http://127.0.0.1:PORT (loopback only)")
    p.add_argument("ids", help="a file of item ids, one per line")
    p.add_argument("header", help="the Authorization header's value")
    p.add_argument("--org", default="748369814")
    p.add_argument("--workers", type=int, default=8)
    args = p.parse_args()
    if urllib.parse.urlsplit(args.base).hostname != "127.0.0.1":
        p.error("base must be http://127.0.0.1:PORT")
    ids = Path(args.ids).read_text().split()
    urls = [f"{args.base}/inventory/v1/items/{i}/image?organization_id={args.org}" for i in ids]
    images, nbytes = run_loop(fetch_all(urls, args.header, args.workers))
    print(json.dumps({"images": images, "bytes": nbytes}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
