"""Render the scenarios' data as bench/RESULTS.md, with each target met or not."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .common import fmt, median
from .scenarios import AIO, ARIA, SEQ, ZIS, ZIS_DISK

MB = "MB"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: bool = True) -> list[str]:
    align = ["---"] + ["---:" if numeric else "---"] * (len(head) - 1)
    return [_row(head), _row(align), *(_row(r) for r in rows)]


def _verdict(ok: bool | None) -> str:
    if ok is None:
        return "not measured"
    return "**met**" if ok else "**not met**"


class Targets:
    """Collects (target, measured, verdict) rows while the sections are rendered."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, target: str, measured: str, ok: bool | None, verdict: str | None = None) -> None:
        """Record one target (``verdict`` overrides the met / not met wording)."""
        self.rows.append((target, measured, verdict or _verdict(ok)))

    def render(self) -> list[str]:
        """The summary table."""
        return _table(["target (issue 5)", "measured", "verdict"], self.rows, numeric=False)


def _m(summary: dict[str, dict[str, list[float]]], who: str, key: str) -> float:
    return median(summary.get(who, {}).get(key, []))


def raw_section(
    data: dict[str, Any],
    targets: Targets,
    rss_elsewhere: list[tuple[str, float, float | None]],
) -> list[str]:
    """Scenario 1."""
    s = data["summary"]
    aria_ips = _m(s, ARIA, "images_per_s")
    aria_cpu = _m(s, ARIA, "cpu_per_1k")
    head = [
        "contender",
        "images/s",
        "MB/s",
        "CPU s / 1k images",
        "CPU use (cores)",
        "peak RSS (MB)",
        "nginx CPU s / 1k",
        "images/s ÷ aria2c",
        "CPU/1k ÷ aria2c",
    ]
    rows: list[list[str]] = []
    label = {ZIS_DISK: ZIS_DISK, AIO: "aiohttp alone (reference: bodies dropped, no file)"}
    for who in (ZIS, ARIA, SEQ, ZIS_DISK, AIO):
        if who not in s:
            continue
        d = s[who]
        rows.append(
            [
                label.get(who, who + " (tmpfs)"),
                fmt(d["images_per_s"]),
                fmt(d["mb_per_s"]),
                fmt(d["cpu_per_1k"], 2),
                fmt([c / 100 for c in d["cpu_util"]], 2),
                fmt(d["rss_mb"]),
                fmt(d["server_cpu_per_1k"], 3),
                f"{median(d['images_per_s']) / aria_ips:.2f}" if aria_ips else "",
                f"{median(d['cpu_per_1k']) / aria_cpu:.2f}" if aria_cpu else "",
            ]
        )
    w = data.get("wrk") or {}
    if w:
        rows.append(
            [
                "wrk -t1 -c8 (requests/s, bodies discarded)",
                fmt(w["requests_per_s"]),
                fmt(w["mb_per_s"]),
                "",
                "",
                "",
                fmt(w["server_cpu_per_1k"], 3),
                f"{median(w['requests_per_s']) / aria_ips:.2f}" if aria_ips else "",
                "",
            ]
        )
    out = [
        "## 1. Raw throughput",
        "",
        f"{data['images']:,} images ({data['bytes'] / 1e6:,.0f} MB, mean "
        f"{data['bytes'] / data['images'] / 1e3:.0f} KB) in {data['pages']} catalogue pages, "
        f"served by nginx (1 worker) on loopback; {data['workers']} workers / `-j "
        f"{data['workers']}` / 8 wrk connections. Images/s and MB/s are over each process's "
        "whole life (start-up, token, paging included). Output on tmpfs except the ext4 row.",
        "",
        *_table(head, rows),
        "",
    ]
    zis_pass = s.get(ZIS, {}).get("pass_images_per_s", [])
    disk_pass = s.get(ZIS_DISK, {}).get("pass_images_per_s", [])
    if zis_pass:
        out.append(
            f"zoho-image-sync's own pass rate (report `duration_seconds`, start-up excluded): "
            f"{fmt(zis_pass)} images/s on tmpfs"
            + (f", {fmt(disk_pass)} on ext4" if disk_pass else "")
            + ". The ext4 row is the cost of the fsyncs (one per file, one per folder per batch)."
        )
        out.append("")
    if ZIS in s and aria_ips:
        ratio = _m(s, ZIS, "images_per_s") / aria_ips
        targets.add(
            "raw, tmpfs: images/s ≥ 1.0 × aria2c",
            f"{_m(s, ZIS, 'images_per_s'):.0f} vs {aria_ips:.0f} images/s = {ratio:.2f} ×",
            ratio >= 1.0,
        )
        cratio = _m(s, ZIS, "cpu_per_1k") / aria_cpu
        targets.add(
            "raw, tmpfs: CPU per 1,000 images ≤ 1.5 × aria2c",
            f"{_m(s, ZIS, 'cpu_per_1k'):.2f} vs {aria_cpu:.2f} CPU s = {cratio:.2f} ×",
            cratio <= 1.5,
        )
        rss = _m(s, ZIS, "rss_mb")
        n = int(data["images"])
        evidence = [f"{rss:.0f} MB at {n:,} images ({n:,} items, scenario 1)"]
        evidence += [f"{v:.0f} MB at {label}" for label, v, _ in rss_elsewhere]
        # Independence of the number of images is judged on one catalogue: scenario 4's
        # first sync (10 % of the items downloaded) against its no-change re-sync (none
        # downloaded). Across scenarios the catalogue grows with the images, and the state
        # of a bigger catalogue costs memory of its own (the scale target covers that).
        same = [(v, base) for _, v, base in rss_elsewhere if base is not None]
        if same:
            flat: bool | None = all(v <= 1.15 * base for v, base in same)
            evidence += [
                f"same catalogue: {v:.0f} MB downloading vs {base:.0f} MB downloading nothing"
                for v, base in same
            ]
        else:
            small = [v for label, v, _ in rss_elsewhere if "scenario 2" in label]
            flat = all(abs(rss - v) <= 0.15 * v for v in small) if small else None
        targets.add(
            "raw: peak RSS ≤ 80 MB and independent of the number of images",
            "; ".join(evidence),
            None if flat is None else (rss <= 80.0 and flat),
        )
    return out


def latency_section(data: dict[str, Any], targets: Targets) -> list[str]:
    """Scenario 2."""
    s = data["summary"]
    bound = float(data["bound"])
    seq = _m(s, SEQ, "images_per_s")
    head = [
        "contender",
        "images/s",
        "% of bound",
        "× sequential",
        "CPU s / 1k images",
        "peak RSS (MB)",
    ]
    rows: list[list[str]] = []
    for who in (ZIS, ARIA, SEQ):
        if who not in s:
            continue
        d = s[who]
        ips = median(d["images_per_s"])
        rows.append(
            [
                who,
                fmt(d["images_per_s"], 1),
                f"{100 * ips / bound:.1f}%",
                f"{ips / seq:.2f}" if seq else "",
                fmt(d["cpu_per_1k"], 2),
                fmt(d["rss_mb"]),
            ]
        )
    zis_pass = s.get(ZIS, {}).get("pass_images_per_s", [])
    if zis_pass:
        p = median(zis_pass)
        rows.append(
            [
                "zoho-image-sync, pass only (report duration)",
                fmt(zis_pass, 1),
                f"{100 * p / bound:.1f}%",
                f"{p / seq:.2f}" if seq else "",
                "",
                "",
            ]
        )
    w = data.get("wrk") or {}
    if w:
        r = median(w["requests_per_s"])
        rows.append(
            [
                "wrk -t1 -c8 (requests/s)",
                fmt(w["requests_per_s"], 1),
                f"{100 * r / bound:.1f}%",
                f"{r / seq:.2f}" if seq else "",
                "",
                "",
            ]
        )
    out = [
        "## 2. Latency-bound",
        "",
        f"{data['images']:,} images; nginx holds every items and image response "
        f"{data['latency'] * 1000:.0f} ms (echo module `echo_sleep`, then the static file). "
        f"Concurrency bound = {data['workers']} workers ÷ {data['latency']:g} s = "
        f"**{bound:.0f} images/s**; a one-at-a-time client is bound by "
        f"{1 / data['latency']:.0f}/s.",
        "",
        *_table(head, rows),
        "",
    ]
    if ZIS in s:
        ips = _m(s, ZIS, "images_per_s")
        p = median(zis_pass) if zis_pass else ips
        whole_ok, pass_ok = ips >= 0.9 * bound, p >= 0.9 * bound
        targets.add(
            "latency-bound: ≥ 90% of workers ÷ 50 ms",
            f"{ips:.1f} images/s = {100 * ips / bound:.1f}% of {bound:.0f} over the whole "
            f"process (start-up included); {p:.1f} = {100 * p / bound:.1f}% over the pass",
            whole_ok,
            None
            if whole_ok == pass_ok
            else (
                f"**{'met' if pass_ok else 'not met'}** for the pass, "
                f"**{'met' if whole_ok else 'not met'}** for the whole process"
            ),
        )
        if seq:
            targets.add(
                "latency-bound: ≥ 7 × the sequential client at 8 workers",
                f"{ips / seq:.2f} × ({ips:.1f} vs {seq:.1f} images/s)",
                ips / seq >= 7.0,
            )
    return out


def rate_section(data: dict[str, Any], targets: Targets) -> list[str]:
    """Scenario 3."""
    reps: list[dict[str, Any]] = data["reps"]
    limit = int(data["limit"])

    def col(key: str) -> list[float]:
        return [float(r[key]) for r in reps]

    rows = [
        ["API requests (pages + images)", fmt(col("api_requests"))],
        ["first → last request (s)", fmt(col("span_seconds"), 1)],
        ["full 60 s windows covered", fmt(col("full_windows"))],
        ["achieved requests/min (steady state)", fmt(col("achieved_per_minute"), 1)],
        ["utilisation (achieved ÷ configured)", f"{100 * median(col('utilisation')):.1f}%"],
        ["requests/min over the whole span (naive)", fmt(col("naive_per_minute"), 1)],
        [
            "max in any 60 s window (harness / simulator)",
            f"{max(col('max_in_window')):.0f} / "
            f"{max(float(r['sim_max_in_window'] or 0) for r in reps):.0f} (limit {limit})",
        ],
        ["429 responses", f"{sum(col('rejected_429')):.0f}"],
        ["CPU while waiting on the window (% of one core)", fmt(col("idle_cpu_pct"), 2)],
        ["seconds of waiting measured", fmt(col("idle_seconds"), 0)],
        ["CPU over the whole pass (% of one core)", fmt(col("cpu_pct"), 2)],
        ["CPU s per 1,000 requests", fmt(col("cpu_per_1k_requests"), 2)],
        ["peak RSS (MB)", fmt(col("rss_mb"))],
        ["pass status", ", ".join(str(r["status"]) for r in reps)],
    ]
    out = [
        "## 3. Rate-limited pass",
        "",
        f"The simulator enforces {limit} requests per rolling 60 s window (Zoho's rule, "
        f"scaled up from 100/min) and 10 in flight; zoho-image-sync is configured with the "
        f"same figures, {data['workers']} workers, {data['items']:,} items "
        f"({data['with_images']:,} with an image), output on tmpfs. {len(reps)} pass(es).",
        "",
        "Steady-state rate: with the window as the bottleneck the k·L+1-th request can only "
        "leave once the first has left the window, so achieved = k·L ÷ (t[k·L] − t[0]) for "
        "the k full windows the pass covered (L the limit); the naive figure (all requests ÷ "
        "first-to-last span) counts the last, partial burst and can exceed 100%. "
        "'Waiting' is every gap of ≥ 3 s between two API arrivals (the client is held by "
        "its own window), from /proc CPU samples every 0.5 s.",
        "",
        *_table(["measure", "value"], rows),
        "",
    ]
    util = median(col("utilisation"))
    targets.add("rate-limited: utilisation ≥ 98%", f"{100 * util:.1f}%", util >= 0.98)
    rejected = sum(col("rejected_429"))
    targets.add("rate-limited: zero 429s", f"{rejected:.0f}", rejected == 0)
    mx = max(col("max_in_window"))
    targets.add(
        "rate-limited: max in any 60 s window ≤ the limit", f"{mx:.0f} ≤ {limit}", mx <= limit
    )
    idle = median(col("idle_cpu_pct"))
    whole = median(col("cpu_pct"))
    targets.add(
        "rate-limited: pacing costs < 2% of one core",
        f"{idle:.2f}% while waiting on the window ({whole:.1f}% over the whole pass, "
        f"downloads included)",
        idle < 2.0,
    )
    return out


def scale_section(data: dict[str, Any], targets: Targets) -> list[str]:
    """Scenario 4."""
    by: dict[str, dict[str, Any]] = data["by_size"]
    sizes = [str(s) for s in data["sizes"]]
    base_rss = float(data["baseline_rss_mb"])

    def rs(n: str, key: str) -> list[float]:
        return [float(r[key]) for r in by[n]["resync"] if r.get(key) is not None]

    head = ["measure", *[f"{int(n):,} items" for n in sizes]]
    if len(sizes) == 2:
        head.append("ratio")

    def row(
        label: str, vals: list[float], digits: int = 2, show: list[str] | None = None
    ) -> list[str]:
        cells = show or [f"{v:,.{digits}f}" for v in vals]
        if len(sizes) == 2:
            cells.append(f"{vals[1] / vals[0]:.1f} ×" if vals[0] else "")
        return [label, *cells]

    walls = [median(rs(n, "wall")) for n in sizes]
    cpus = [median(rs(n, "cpu")) for n in sizes]
    rsss = [median(rs(n, "rss_mb")) for n in sizes]
    saves_disk = [by[n]["save_disk"]["save"] * 1000 for n in sizes]
    saves_tmp = [by[n]["save_tmpfs"]["save"] * 1000 for n in sizes]
    encodes = [by[n]["save_tmpfs"]["encode"] * 1000 for n in sizes]
    loads = [by[n]["save_tmpfs"]["load"] * 1000 for n in sizes]
    sizes_b = [by[n]["state_bytes"] / 1e6 for n in sizes]
    reqs = [median(rs(n, "api_requests")) for n in sizes]
    pages = [float(by[n]["pages"]) for n in sizes]
    rows = [
        row(
            "items with an image (synced by a first pass)",
            [float(by[n]["with_images"]) for n in sizes],
            0,
        ),
        row("re-sync wall time (s)", walls, 2, [fmt(rs(n, "wall"), 2) for n in sizes]),
        row("re-sync CPU (s)", cpus, 2, [fmt(rs(n, "cpu"), 2) for n in sizes]),
        row(
            "API requests / catalogue pages",
            reqs,
            0,
            [f"{median(rs(n, 'api_requests')):.0f} / {by[n]['pages']}" for n in sizes],
        ),
        row("peak RSS (MB)", rsss, 0, [fmt(rs(n, "rss_mb")) for n in sizes]),
        row(
            f"peak RSS above the idle process ({base_rss:.0f} MB)", [r - base_rss for r in rsss], 0
        ),
        row("state file (MB)", sizes_b, 1),
        row("state save, ext4: encode + write + fsync (ms)", saves_disk, 0),
        row("state save, tmpfs (ms)", saves_tmp, 0),
        row("  of which json.dumps + encode (ms)", encodes, 0),
        row("state load (ms)", loads, 0),
        row("first sync: wall (s)", [float(by[n]["first"]["wall"]) for n in sizes], 1),
        row("first sync: peak RSS (MB)", [float(by[n]["first"]["rss_mb"]) for n in sizes], 0),
        row(
            "simulator: catalogue build (s)", [float(by[n]["sim_build_seconds"]) for n in sizes], 2
        ),
    ]
    only_pages = all(
        set((r.get("requests") or {}).keys()) <= {"items", "admin"}
        and r.get("images_downloaded") == 0
        for n in sizes
        for r in by[n]["resync"]
    )
    out = [
        "## 4. Catalogue scale",
        "",
        "Simulator (no limits) with 10% of the items carrying an image, all synced by a first "
        "pass; then no-change re-syncs (full scan: `once` never runs incrementally), "
        "alternating sizes. State save times are `State.save_sync` on a copy of the "
        "resulting state file, median of 5 (the same code path as the daemon's saves, run "
        "in the harness). Output on tmpfs.",
        "",
        *_table(head, rows),
        "",
        f"Re-sync requests were items pages only, no image and no token request: "
        f"**{'yes' if only_pages and reqs == pages else 'no'}**.",
        "",
    ]
    if len(sizes) == 2:
        big = sizes[1]
        targets.add(
            f"scale: {int(big):,} items re-synced with peak RSS ≤ 150 MB",
            f"{rsss[1]:.0f} MB",
            rsss[1] <= 150.0,
        )
        targets.add(
            "scale: state save ≤ 300 ms",
            f"{saves_disk[1]:.0f} ms on ext4, {saves_tmp[1]:.0f} ms on tmpfs "
            f"({sizes_b[1]:.1f} MB file)",
            saves_disk[1] <= 300.0,
        )
        growth = {
            "wall": walls[1] / walls[0],
            "CPU": cpus[1] / cpus[0],
            "RSS above idle": (rsss[1] - base_rss) / max(rsss[0] - base_rss, 1e-9),
            # The work of a save (encode + write) on tmpfs: on ext4 the small save is a
            # few ms of fsync latency, and its ratio measures the disk's mood, not growth.
            "save (tmpfs)": saves_tmp[1] / saves_tmp[0],
            "file": sizes_b[1] / sizes_b[0],
        }
        factor = int(big) / int(sizes[0])
        targets.add(
            "scale: cost grows linearly, not faster",
            ", ".join(f"{k} {v:.1f} ×" for k, v in growth.items()) + f" for {factor:.0f} × items",
            all(v <= factor * 1.25 for v in growth.values()) and only_pages,
        )
    return out


def profile_section(data: dict[str, Any]) -> list[str]:
    """Scenario 5."""
    if "skipped" in data:
        return ["## 5. Work per image", "", f"Skipped: {data['skipped']}", ""]
    top = data["top"][0]

    def t(items: list[dict[str, Any]], n: int) -> list[list[str]]:
        return [
            [f"`{x['what']}`", f"{x['share']:.1f}%", f"{x['ms_per_1k']:.0f}"] for x in items[:n]
        ]

    return [
        "## 5. Work per image",
        "",
        "py-spy (`record --threads --subprocesses --nonblocking --rate 250`, idle threads "
        f"excluded) over one scenario-1 pass of {data['images']:,} images, the daemon and its "
        "image writer process. Full summary in `bench/PROFILE.txt`, collapsed stacks in "
        "`bench/profile-collapsed.txt`. 'ms / 1k' is thread time on the CPU per 1,000 images; "
        "py-spy counts the writer's wait for its next request (`recvmsg`) as busy, so its "
        "share is an upper bound (its CPU is in the scenario-1 table).",
        "",
        "By thread:",
        "",
        *_table(["thread", "share", "ms / 1k"], t(top["threads"], 5)),
        "",
        "By area (module of the innermost frame):",
        "",
        *_table(["module", "share", "ms / 1k"], t(top["areas"], 10)),
        "",
        "By the nearest zoho_image_sync frame (which of our calls led to the cost):",
        "",
        *_table(["our function", "share", "ms / 1k"], t(top["ours"], 10)),
        "",
        "Self time by function:",
        "",
        *_table(["function", "share", "ms / 1k"], t(top["self"], 10)),
        "",
    ]


def render(env: dict[str, str], results: dict[str, Any]) -> str:
    """The whole RESULTS.md."""
    targets = Targets()
    sections: list[str] = []
    rss_elsewhere: list[tuple[str, float, float | None]] = []
    if "latency" in results:
        lat = results["latency"]
        n = int(lat["images"])
        rss_lat = lat["summary"].get(ZIS, {}).get("rss_mb", [])
        if rss_lat:
            rss_elsewhere.append((f"{n:,} images ({n:,} items, scenario 2)", median(rss_lat), None))
    if "rate" in results:
        rate = results["rate"]
        rss_rate = [float(r["rss_mb"]) for r in rate["reps"]]
        rss_elsewhere.append(
            (
                f"{rate['with_images']:,} images ({rate['items']:,} items, scenario 3)",
                median(rss_rate),
                None,
            )
        )
    if "scale" in results:
        for v in results["scale"]["by_size"].values():
            rss_elsewhere.append(
                (
                    f"{v['with_images']:,} images ({v['items']:,} items, scenario 4 first sync)",
                    float(v["first"]["rss_mb"]),
                    median([float(r["rss_mb"]) for r in v["resync"]]),
                )
            )
    if "raw" in results:
        sections += raw_section(results["raw"], targets, rss_elsewhere)
    if "latency" in results:
        sections += latency_section(results["latency"], targets)
    if "rate" in results:
        sections += rate_section(results["rate"], targets)
    else:
        targets.add("rate-limited (scenario 3)", "skipped (BENCH=quick)", None)
    if "scale" in results:
        sections += scale_section(results["scale"], targets)
    if "profile" in results:
        sections += profile_section(results["profile"])
    head = [
        "# Benchmark results",
        "",
        f"Produced by `{env['command']}` on {env['date']} ({env['duration']} for the whole run).",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPUs | {env['cpus']} × {env['cpu_model']} |",
        f"| memory | {env['memory']} |",
        f"| kernel | {env['kernel']} |",
        f"| python | {env['python']} |",
        f"| aiohttp | {env['aiohttp']} |",
        f"| zoho-image-sync | {env['zis']} |",
        f"| nginx | {env['nginx']} |",
        f"| aria2c | {env['aria2c']} |",
        f"| wrk | {env['wrk']} |",
        f"| py-spy | {env['py_spy']} |",
        "",
        "Each contender is a child process run under GNU time: user+sys CPU from `wait4`, "
        "peak RSS from GNU time's `%M` (the kernel's high-water mark of the command itself), "
        "wall time from the harness's clock. Cells are `median ±spread` over the "
        f"repetitions ({env['reps']} unless said otherwise), spread = half the min–max range "
        "relative to the median; contenders run in alternating order (A B C, C B A, ...). "
        "Absolute numbers drift on a shared 2-core machine: read the ratios. MB = 10⁶ bytes.",
        "",
        "## Targets",
        "",
        *targets.render(),
        "",
        *sections,
        "## How the fixtures are built",
        "",
        "- The static catalogue is generated from the simulator's own `Catalogue` (same item "
        "JSON, real JPEG bytes padded with COM segments, 30–300 KB, mean ≈ 100 KB) and written "
        "as files: `pages/N.json` and `img/ID`. nginx maps `$arg_page` to a page file and the "
        "item id to an image, answers 401 to an image request without the token, and serves "
        "the token as `return 200 '<json>'` (`return` answers a POST, a static file would "
        "answer 405).",
        "- The 50 ms delay is nginx's echo module (`echo_sleep 0.05;` then `echo_exec` to the "
        "static file), so no proxy process competes for the two cores.",
        "- aria2c gets the same image URLs (it does not page the catalogue) with the same "
        "`Authorization` header: `aria2c -j 8 --auto-file-renaming=false "
        "--allow-overwrite=true -i LIST -d DIR --header ... --console-log-level=warn "
        "--summary-interval=0 --download-result=hide`.",
        "- The sequential client (`bench/seqclient.py`) mints the token, pages the catalogue, "
        "then GETs one image at a time over one kept-alive connection and writes it with "
        "`open().write()` (no temporary file, no fsync), as the old scripts did.",
        "- zoho-image-sync runs `once` with requests_per_minute 100000, "
        "max_concurrent_requests 100, daily budget 1e9, 8 workers, log level info (JSON "
        "to a file), a fresh state folder per run (so one token POST per run).",
        "- Per-run logs are kept under the disk work folder while the run lasts; "
        "`bench/results.json` holds every repetition's raw numbers.",
        "",
    ]
    return "\n".join(head)
