"""The five scenarios of issue 5. Each returns plain data; ``report.py`` renders it.

Every contender is a child process measured by ``common.run_measured`` (wall clock,
user+sys CPU and peak RSS from ``wait4``). Repetitions alternate the contenders'
order (A B C, C B A, A B C, ...) so drift on a shared machine hits them alike.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from zoho_image_sync.simulator.records import max_arrivals_in_window

from .common import ROOT, Measured, count_files, median, run_measured
from .fixtures import (
    ORG_ID,
    TOKEN,
    Nginx,
    SimProcess,
    Site,
    build_site,
    rmtree,
    write_zis_config,
    zis_argv,
    zis_env,
)

T = TypeVar("T")

ZIS = "zoho-image-sync"
ZIS_DISK = "zoho-image-sync (ext4 disk)"
ARIA = "aria2c"
SEQ = "sequential client"
AIO = "aiohttp alone"  # a reference: the same library and loop, bodies dropped


@dataclass
class Context:
    """Where and how much: folders, sizes, repetitions."""

    tmpfs: Path  # output of the contenders (/dev/shm)
    disk: Path  # the real disk (ext4): nginx's files, the fsync row
    reps: int = 3
    images: int = 5000
    latency_images: int = 1000
    latency: float = 0.05
    workers: int = 8
    rate_per_minute: int = 1200
    rate_items: int = 3000
    rate_with_images: int = 2700
    rate_reps: int = 1
    scale_items: tuple[int, ...] = (10_000, 100_000)
    scale_image_share: float = 0.10
    wrk_seconds: float = 8.0
    log: Callable[[str], None] = print
    site_cache: dict[int, Site] = field(default_factory=dict)

    def site(self, n: int) -> Site:
        """The static catalogue with ``n`` images (built once per run)."""
        if n not in self.site_cache:
            t0 = time.perf_counter()
            self.site_cache[n] = build_site(self.disk / f"www-{n}", n)
            self.log(f"  generated {n} images in {time.perf_counter() - t0:.1f} s")
        return self.site_cache[n]


@dataclass
class Run:
    """One contender, one repetition."""

    contender: str
    rep: int
    wall: float
    cpu: float
    rss_mb: float
    images: int
    bytes: int
    server_cpu: float = 0.0
    pass_seconds: float | None = None
    report: dict[str, Any] | None = None

    @property
    def images_per_s(self) -> float:
        """Images over the process's wall time."""
        return self.images / self.wall if self.wall else 0.0


def alternating(contenders: Sequence[T], rep: int) -> list[T]:
    """A B C on even repetitions, C B A on odd ones."""
    return list(contenders) if rep % 2 == 0 else list(reversed(contenders))


def aria_list(path: Path, base: str, ids: Sequence[str]) -> Path:
    """aria2c's input file: every image URL, each with its output name."""
    path.write_text(
        "".join(
            f"{base}/inventory/v1/items/{i}/image?organization_id={ORG_ID}\n  out={i}.jpg\n"
            for i in ids
        )
    )
    return path


def aria_argv(list_path: Path, out: Path, jobs: int) -> list[str]:
    """The aria2c command line (flags from the issue, plus quiet console output)."""
    return [
        "aria2c",
        "-j",
        str(jobs),
        "--auto-file-renaming=false",
        "--allow-overwrite=true",
        "-i",
        str(list_path),
        "-d",
        str(out),
        "--header",
        f"Authorization: Zoho-oauthtoken {TOKEN}",
        "--console-log-level=warn",
        "--summary-interval=0",
        "--download-result=hide",
    ]


def _check(run: Run, site: Site, log_hint: Path) -> None:
    if run.images != len(site.ids) or run.bytes != site.total_bytes:
        raise RuntimeError(
            f"{run.contender} rep {run.rep}: wrote {run.images} images / {run.bytes} bytes, "
            f"expected {len(site.ids)} / {site.total_bytes}: {_tail(log_hint)}"
        )


def run_contender(
    ctx: Context, name: str, rep: int, ng: Nginx, site: Site, aria_input: Path, tag: str
) -> Run:
    """Run one contender against nginx into a fresh folder, check and measure it."""
    out_root = (ctx.disk if name == ZIS_DISK else ctx.tmpfs) / f"{tag}-{rep}-{_slug(name)}"
    logs = ctx.disk / "logs"
    logs.mkdir(exist_ok=True)
    log_stem = logs / f"{tag}-{rep}-{_slug(name)}"
    rmtree(out_root)
    out_root.mkdir(parents=True)
    os.sync()
    cpu0 = ng.worker_cpu()
    report: dict[str, Any] | None = None
    if name in (ZIS, ZIS_DISK):
        cfg = write_zis_config(
            out_root / "config.toml", ng.base, out_root / "data", workers=ctx.workers
        )
        m = run_measured(
            zis_argv(cfg),
            env=zis_env(simulator=False),
            stdout_path=Path(f"{log_stem}.out"),
            stderr_path=Path(f"{log_stem}.err"),
        )
        images_dir = out_root / "data" / "images" / "item"
        report = _read_report(Path(f"{log_stem}.out"))
    elif name == ARIA:
        images_dir = out_root / "images"
        m = run_measured(
            aria_argv(aria_input, images_dir, ctx.workers),
            stdout_path=Path(f"{log_stem}.out"),
            stderr_path=Path(f"{log_stem}.err"),
        )
    elif name == SEQ:
        images_dir = out_root / "images"
        m = run_measured(
            [sys.executable, "-m", "bench.seqclient", ng.base, str(images_dir)],
            cwd=ROOT,
            stdout_path=Path(f"{log_stem}.out"),
            stderr_path=Path(f"{log_stem}.err"),
        )
    elif name == AIO:
        ids = out_root / "ids.txt"
        ids.write_text("".join(f"{i}\n" for i in site.ids))
        argv = [sys.executable, "-m", "bench.aioclient", ng.base, str(ids)]
        m = run_measured(
            [*argv, f"Zoho-oauthtoken {TOKEN}", "--workers", str(ctx.workers)],
            cwd=ROOT,
            stdout_path=Path(f"{log_stem}.out"),
            stderr_path=Path(f"{log_stem}.err"),
        )
    else:
        raise ValueError(name)
    server_cpu = ng.worker_cpu() - cpu0
    if m.returncode != 0:
        raise RuntimeError(f"{name} exited {m.returncode}: {_tail(Path(f'{log_stem}.err'))}")
    if name == AIO:  # writes nothing: it reports what it received
        got = _read_report(Path(f"{log_stem}.out")) or {}
        n, nbytes = int(got.get("images", 0)), int(got.get("bytes", 0))
    else:
        n, nbytes = count_files(images_dir)
    run = Run(
        contender=name,
        rep=rep,
        wall=m.wall,
        cpu=m.cpu,
        rss_mb=m.rss_mb,
        images=n,
        bytes=nbytes,
        server_cpu=server_cpu,
        report=report,
    )
    if report is not None:
        run.pass_seconds = float(report.get("duration_seconds") or 0.0) or None
    _check(run, site, Path(f"{log_stem}.err"))
    rmtree(out_root)
    os.sync()
    return run


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = json.loads(path.read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None
    return doc


def wrk_reference(ctx: Context, ng: Nginx, site: Site, seconds: float) -> dict[str, float]:
    """wrk on the image URLs: 1 thread, ``workers`` connections; bodies discarded."""
    ids = ctx.disk / f"wrk-ids-{len(site.ids)}.txt"
    ids.write_text("".join(f"{i}\n" for i in site.ids))
    script = ctx.disk / "wrk-images.lua"
    script.write_text(
        f"""local ids = {{}}
for line in io.lines("{ids}") do ids[#ids + 1] = line end
local i = 0
wrk.headers["Authorization"] = "Zoho-oauthtoken {TOKEN}"
request = function()
  i = i % #ids + 1
  return wrk.format("GET", "/inventory/v1/items/" .. ids[i] .. "/image?organization_id={ORG_ID}")
end
"""
    )
    argv = [
        "wrk",
        "-t1",
        f"-c{ctx.workers}",
        f"-d{seconds:g}s",
        "-s",
        str(script),
        ng.base,
    ]
    cpu0 = ng.worker_cpu()
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    server_cpu = ng.worker_cpu() - cpu0
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
    tr = re.search(r"Transfer/sec:\s*([\d.]+)(\w+)", out)
    assert tr is not None
    unit = {"B": 1.0, "KB": 1024.0, "MB": 1024.0**2, "GB": 1024.0**3}[tr.group(2)]
    mbps = float(tr.group(1)) * unit / 1e6
    requests = rps * seconds
    return {
        "requests_per_s": rps,
        "mb_per_s": mbps,
        "server_cpu_per_1k": server_cpu / requests * 1000 if requests else 0.0,
    }


def _summarise(runs: list[Run]) -> dict[str, dict[str, list[float]]]:
    by: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        d = by.setdefault(r.contender, {})
        d.setdefault("wall", []).append(r.wall)
        d.setdefault("images_per_s", []).append(r.images_per_s)
        d.setdefault("mb_per_s", []).append(r.bytes / r.wall / 1e6)
        d.setdefault("cpu_per_1k", []).append(r.cpu / r.images * 1000)
        d.setdefault("cpu_util", []).append(r.cpu / r.wall * 100)
        d.setdefault("rss_mb", []).append(r.rss_mb)
        d.setdefault("server_cpu_per_1k", []).append(r.server_cpu / r.images * 1000)
        if r.pass_seconds:
            d.setdefault("pass_images_per_s", []).append(r.images / r.pass_seconds)
    return by


# -- 1. raw throughput ---------------------------------------------------------------


def raw_throughput(ctx: Context) -> dict[str, Any]:
    """Scenario 1: 5,000 images from nginx on loopback, limits off."""
    site = ctx.site(ctx.images)
    contenders = [ZIS, ARIA, SEQ, ZIS_DISK, AIO]
    runs: list[Run] = []
    wrk: list[dict[str, float]] = []
    with Nginx(ctx.disk / "nginx-raw", site.docroot) as ng:
        aria_input = aria_list(ctx.disk / "aria-raw.txt", ng.base, site.ids)
        # One untimed warm-up pass: page cache, nginx's open files, Python's .pyc files.
        runs_warm = run_contender(ctx, ZIS, -1, ng, site, aria_input, "raw-warmup")
        ctx.log(f"  warm-up: {runs_warm.images_per_s:.0f} images/s")
        for rep in range(ctx.reps):
            for name in alternating(contenders, rep):
                r = run_contender(ctx, name, rep, ng, site, aria_input, "raw")
                runs.append(r)
                ctx.log(
                    f"  rep {rep} {name}: {r.images_per_s:.0f} images/s, "
                    f"cpu {r.cpu:.2f} s, rss {r.rss_mb:.0f} MB"
                )
            w = wrk_reference(ctx, ng, site, ctx.wrk_seconds)
            wrk.append(w)
            ctx.log(f"  rep {rep} wrk: {w['requests_per_s']:.0f} requests/s")
    return {
        "images": len(site.ids),
        "bytes": site.total_bytes,
        "pages": site.pages,
        "workers": ctx.workers,
        "summary": _summarise(runs),
        "wrk": {k: [w[k] for w in wrk] for k in wrk[0]} if wrk else {},
        "runs": [_run_dict(r) for r in runs],
    }


def _run_dict(r: Run) -> dict[str, Any]:
    d = asdict(r)
    d.pop("report", None)
    if r.report is not None:
        d["statistics"] = r.report.get("statistics")
    return d


# -- 2. latency-bound ----------------------------------------------------------------


def latency_bound(ctx: Context) -> dict[str, Any]:
    """Scenario 2: every items/image response held ``latency`` s by nginx (echo_sleep)."""
    site = ctx.site(ctx.latency_images)
    contenders = [ZIS, ARIA, SEQ]
    runs: list[Run] = []
    wrk: list[dict[str, float]] = []
    with Nginx(ctx.disk / "nginx-latency", site.docroot, delay=ctx.latency) as ng:
        aria_input = aria_list(ctx.disk / "aria-latency.txt", ng.base, site.ids)
        for rep in range(ctx.reps):
            for name in alternating(contenders, rep):
                r = run_contender(ctx, name, rep, ng, site, aria_input, "lat")
                runs.append(r)
                ctx.log(f"  rep {rep} {name}: {r.images_per_s:.1f} images/s")
            w = wrk_reference(ctx, ng, site, 5.0)
            wrk.append(w)
            ctx.log(f"  rep {rep} wrk: {w['requests_per_s']:.1f} requests/s")
    return {
        "images": len(site.ids),
        "latency": ctx.latency,
        "workers": ctx.workers,
        "bound": ctx.workers / ctx.latency,
        "summary": _summarise(runs),
        "wrk": {k: [w[k] for w in wrk] for k in wrk[0]} if wrk else {},
        "runs": [_run_dict(r) for r in runs],
    }


# -- 3. rate-limited -----------------------------------------------------------------


def _idle_cpu(
    samples: Sequence[tuple[float, float]], arrivals: Sequence[float], min_gap: float = 3.0
) -> tuple[float, float]:
    """(CPU seconds, seconds) spent inside gaps between API arrivals longer than min_gap."""
    cpu = secs = 0.0
    for a, b in itertools.pairwise(arrivals):
        if b - a < min_gap:
            continue
        inside = [s for s in samples if a + 0.5 <= s[0] <= b - 0.5]
        if len(inside) >= 2:
            cpu += inside[-1][1] - inside[0][1]
            secs += inside[-1][0] - inside[0][0]
    return cpu, secs


def rate_limited(ctx: Context) -> dict[str, Any]:
    """Scenario 3: the simulator enforces a rolling 60 s window; does the pass fill it?"""
    limit = ctx.rate_per_minute
    reps: list[dict[str, Any]] = []
    for rep in range(ctx.rate_reps):
        out_root = ctx.tmpfs / f"rate-{rep}"
        rmtree(out_root)
        out_root.mkdir(parents=True)
        sim_cfg = {
            "items": ctx.rate_items,
            "with_images": ctx.rate_with_images,
            "per_minute": limit,
            "window_seconds": 60.0,
            "max_concurrent": 10,
        }
        logs = ctx.disk / "logs"
        logs.mkdir(exist_ok=True)
        with SimProcess(sim_cfg, logs / f"rate-{rep}-sim.err") as sim:
            cfg = write_zis_config(
                out_root / "config.toml",
                sim.base,
                out_root / "data",
                requests_per_minute=limit,
                max_concurrent=10,
                workers=ctx.workers,
            )
            ctx.log(
                f"  rep {rep}: a pass of ~{ctx.rate_items // 200 + ctx.rate_with_images} "
                f"requests at {limit}/min (about two minutes)"
            )
            sim_cpu0 = sim.cpu()
            m = run_measured(
                zis_argv(cfg),
                env=zis_env(simulator=True),
                stdout_path=logs / f"rate-{rep}.out",
                stderr_path=logs / f"rate-{rep}.err",
                sample_every=0.5,
            )
            sim_cpu = sim.cpu() - sim_cpu0
            records = sim.records()
            stats = sim.stats()
        report = _read_report(logs / f"rate-{rep}.out")
        rmtree(out_root)
        reps.append(_rate_metrics(m, records, stats, report, limit, sim_cpu))
        r = reps[-1]
        ctx.log(
            f"  rep {rep}: utilisation {r['utilisation'] * 100:.1f}%, max/60 s "
            f"{r['max_in_window']}, 429s {r['rejected_429']}, idle CPU {r['idle_cpu_pct']:.2f}%"
        )
    return {
        "limit": limit,
        "items": ctx.rate_items,
        "with_images": ctx.rate_with_images,
        "workers": ctx.workers,
        "reps": reps,
    }


def _rate_metrics(
    m: Measured,
    records: list[dict[str, Any]],
    stats: dict[str, Any],
    report: dict[str, Any] | None,
    limit: int,
    sim_cpu: float,
) -> dict[str, Any]:
    api = sorted(r["t"] for r in records if r["endpoint"] in ("items", "image", "books_image"))
    n = len(api)
    k = (n - 1) // limit
    # Steady-state rate: the first k*limit arrivals span t[k*limit] - t[0] when the window
    # is the bottleneck (the (k*limit+1)-th may only go once the first left the window).
    if k >= 1:
        steady = k * limit / (api[k * limit] - api[0]) * 60.0
    else:
        steady = (n - 1) / (api[-1] - api[0]) * 60.0 if n > 1 else 0.0
    whole = n / (api[-1] - api[0]) * 60.0 if n > 1 else 0.0
    idle_cpu, idle_secs = _idle_cpu(m.samples, api)
    return {
        "api_requests": n,
        "full_windows": k,
        "span_seconds": api[-1] - api[0] if n > 1 else 0.0,
        "wall": m.wall,
        "achieved_per_minute": steady,
        "utilisation": steady / limit,
        "naive_per_minute": whole,
        "max_in_window": max_arrivals_in_window(api, 60.0),
        "sim_max_in_window": stats.get("max_in_window"),
        "rejected_429": sum(1 for r in records if r["status"] == 429),
        "cpu": m.cpu,
        "cpu_pct": m.cpu / m.wall * 100,
        "idle_cpu_pct": idle_cpu / idle_secs * 100 if idle_secs else 0.0,
        "idle_seconds": idle_secs,
        "cpu_per_1k_requests": m.cpu / n * 1000 if n else 0.0,
        "rss_mb": m.rss_mb,
        "sim_cpu": sim_cpu,
        "status": report.get("status") if report else None,
        "statistics": report.get("statistics") if report else None,
        "returncode": m.returncode,
    }


# -- 4. catalogue scale --------------------------------------------------------------


def _save_times(state_file: Path, where: Path, times: int = 5) -> dict[str, float]:
    """Time State.save_sync (encode + write + fsync + rename + dir fsync) on a copy."""
    from zoho_image_sync.state import State

    where.mkdir(parents=True, exist_ok=True)
    copy = where / "state.json"
    shutil.copyfile(state_file, copy)
    t0 = time.perf_counter()
    state = State.read(copy)
    load = time.perf_counter() - t0
    saves: list[float] = []
    encodes: list[float] = []
    for _ in range(times):
        t0 = time.perf_counter()
        state.save_sync()
        saves.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        json.dumps(state._document(), separators=(",", ":"), ensure_ascii=False).encode()
        encodes.append(time.perf_counter() - t0)
    state.close()
    shutil.rmtree(where)
    return {"save": median(saves), "encode": median(encodes), "load": load}


def catalogue_scale(ctx: Context) -> dict[str, Any]:
    """Scenario 4: a no-change re-sync of 10k and 100k items (10% with images)."""
    logs = ctx.disk / "logs"
    logs.mkdir(exist_ok=True)
    sizes = ctx.scale_items
    sims: dict[int, SimProcess] = {}
    out: dict[int, dict[str, Any]] = {}
    try:
        for n in sizes:
            cfg = {
                "items": n,
                "with_images": round(n * ctx.scale_image_share),
                "per_minute": None,
                "max_concurrent": None,
            }
            sims[n] = SimProcess(cfg, logs / f"scale-{n}-sim.err").__enter__()
            ctx.log(
                f"  simulator with {n} items: built in {sims[n].build_seconds:.2f} s, "
                f"serving after {sims[n].startup_seconds:.2f} s"
            )
            out[n] = {
                "items": n,
                "with_images": cfg["with_images"],
                "sim_build_seconds": sims[n].build_seconds,
                "sim_startup_seconds": sims[n].startup_seconds,
                "resync": [],
            }
        # Baseline: the interpreter with the package imported, no catalogue at all.
        base_dir = ctx.tmpfs / "scale-baseline"
        base_dir.mkdir(parents=True, exist_ok=True)
        base_cfg = write_zis_config(base_dir / "config.toml", sims[sizes[0]].base, base_dir)
        mb = run_measured(zis_argv(base_cfg, "status"), env=zis_env(simulator=True))
        baseline_rss = mb.rss_mb
        rmtree(base_dir)
        # First sync (downloads every image): not the point here, but it is the RSS
        # evidence that memory does not grow with the number of images.
        for n in sizes:
            d = ctx.tmpfs / f"scale-{n}"
            rmtree(d)
            d.mkdir(parents=True)
            cfg_path = write_zis_config(
                d / "config.toml", sims[n].base, d / "data", workers=ctx.workers
            )
            m = run_measured(
                zis_argv(cfg_path),
                env=zis_env(simulator=True),
                stdout_path=logs / f"scale-{n}-first.out",
                stderr_path=logs / f"scale-{n}-first.err",
            )
            rep = _read_report(logs / f"scale-{n}-first.out") or {}
            out[n]["first"] = {
                "wall": m.wall,
                "cpu": m.cpu,
                "rss_mb": m.rss_mb,
                "statistics": rep.get("statistics"),
                "returncode": m.returncode,
            }
            ctx.log(
                f"  first sync of {n} items: {m.wall:.1f} s, rss {m.rss_mb:.0f} MB, "
                f"{(rep.get('statistics') or {}).get('images_downloaded')} images"
            )
            if m.returncode != 0:
                raise RuntimeError(f"first sync of {n} items exited {m.returncode}")
        for rep_i in range(ctx.reps):
            for n in alternating(sizes, rep_i):
                sim = sims[n]
                d = ctx.tmpfs / f"scale-{n}"
                sim.reset_log()
                m = run_measured(
                    zis_argv(d / "config.toml"),
                    env=zis_env(simulator=True),
                    stdout_path=logs / f"scale-{n}-resync-{rep_i}.out",
                    stderr_path=logs / f"scale-{n}-resync-{rep_i}.err",
                )
                stats = sim.stats()
                rep = _read_report(logs / f"scale-{n}-resync-{rep_i}.out") or {}
                st = rep.get("statistics") or {}
                out[n]["resync"].append(
                    {
                        "wall": m.wall,
                        "pass_seconds": rep.get("duration_seconds"),
                        "cpu": m.cpu,
                        "rss_mb": m.rss_mb,
                        "requests": stats.get("requests"),
                        "api_requests": stats.get("api_requests"),
                        "report_api_requests": st.get("api_requests"),
                        "images_downloaded": st.get("images_downloaded"),
                        "unchanged": st.get("unchanged"),
                        "returncode": m.returncode,
                    }
                )
                ctx.log(
                    f"  re-sync {n} items: {m.wall:.2f} s, rss {m.rss_mb:.0f} MB, "
                    f"{stats.get('api_requests')} requests"
                )
        for n in sizes:
            state_file = ctx.tmpfs / f"scale-{n}" / "data" / "state.json"
            out[n]["state_bytes"] = state_file.stat().st_size
            out[n]["save_tmpfs"] = _save_times(state_file, ctx.tmpfs / f"save-{n}")
            out[n]["save_disk"] = _save_times(state_file, ctx.disk / f"save-{n}")
            out[n]["pages"] = -(-n // 200)
            rmtree(ctx.tmpfs / f"scale-{n}")
    finally:
        for sim in sims.values():
            sim.__exit__(None, None, None)
    return {
        "sizes": list(sizes),
        "baseline_rss_mb": baseline_rss,
        "by_size": {str(k): v for k, v in out.items()},
    }


# -- 5. work per image ---------------------------------------------------------------


def profile(ctx: Context, out_dir: Path) -> dict[str, Any]:
    """Scenario 5: py-spy over one zoho-image-sync pass of scenario 1."""
    from .profile_summary import summarise

    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        found = shutil.which("py-spy")
        if found is None:
            return {"skipped": "py-spy is not installed (make bench installs it)"}
        py_spy = Path(found)
    site = ctx.site(ctx.images)
    raw = out_dir / "profile-collapsed.txt"
    with Nginx(ctx.disk / "nginx-profile", site.docroot) as ng:
        d = ctx.tmpfs / "profile"
        rmtree(d)
        d.mkdir(parents=True)
        cfg = write_zis_config(d / "config.toml", ng.base, d / "data", workers=ctx.workers)
        argv = [
            str(py_spy), "record", "--nonblocking", "--threads", "--subprocesses", "--rate", "250",
            "--format", "raw", "--output", str(raw), "--", *zis_argv(cfg),
        ]  # fmt: skip
        t0 = time.perf_counter()
        done = subprocess.run(argv, env=zis_env(simulator=False), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        n, _ = count_files(d / "data" / "images" / "item")
        rmtree(d)
    if done.returncode != 0 or not raw.exists():
        return {"skipped": f"py-spy failed: {done.stderr.strip()[-300:]}"}
    text, top = summarise(raw.read_text(), images=n)
    (out_dir / "PROFILE.txt").write_text(text)
    return {"images": n, "wall": wall, "top": top}
