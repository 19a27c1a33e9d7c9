"""The old scripts' way, as a baseline: one request at a time, nothing in parallel.

Mints a token (POST /oauth/v2/token), pages /inventory/v1/items until
``has_more_page`` is false, then GETs each listed image in turn and writes it with a
plain ``open().write()`` (no temporary file, no fsync), as the pre-daemon scripts did.
It keeps one HTTP/1.1 connection alive (http.client), which only helps it: the
loopback connect is cheap, the server-side delay is what it waits on. Prints one JSON
line: ``{"images", "bytes", "pages"}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from http.client import HTTPConnection
from pathlib import Path


def main() -> int:
    """Entry point: ``python -m bench.seqclient BASE OUT_DIR``."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("base", help="http://127.0.0.1:PORT (loopback only)")
    p.add_argument("out", help="output folder")
    p.add_argument("--org", default="748369814")
    args = p.parse_args()
    parts = urllib.parse.urlsplit(args.base)
    if parts.hostname != "127.0.0.1" or parts.port is None:
        p.error("base must be http://127.0.0.1:PORT")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    conn = HTTPConnection("127.0.0.1", parts.port, timeout=60)

    form = urllib.parse.urlencode(
        {
            "refresh_token": "1000.bench0refresh",
            "client_id": "1000.BENCHCLIENT",
            "client_secret": "bench0secret",
            "grant_type": "refresh_token",
        }
    )
    conn.request(
        "POST",
        "/oauth/v2/token",
        body=form,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    token = json.loads(conn.getresponse().read())["access_token"]
    headers = {"Authorization": f"Zoho-oauthtoken {token}"}

    ids: list[str] = []
    page = 1
    while True:
        conn.request(
            "GET",
            f"/inventory/v1/items?page={page}&per_page=200&organization_id={args.org}",
            headers=headers,
        )
        body = json.loads(conn.getresponse().read())
        ids += [item["item_id"] for item in body["items"] if item.get("image_document_id")]
        if not body["page_context"]["has_more_page"]:
            break
        page += 1

    images = total = 0
    for item_id in ids:
        conn.request(
            "GET",
            f"/inventory/v1/items/{item_id}/image?organization_id={args.org}",
            headers=headers,
        )
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            sys.stderr.write(f"{item_id}: HTTP {resp.status}\n")
            continue
        with (out / f"{item_id}.jpg").open("wb") as f:
            f.write(data)
        images += 1
        total += len(data)
    conn.close()
    sys.stdout.write(json.dumps({"images": images, "bytes": total, "pages": page}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
