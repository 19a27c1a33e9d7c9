"""``make bench``: run the scenarios of issue 5 and write bench/RESULTS.md.

    python -m bench.run                 # everything (about 15 minutes on 2 cores)
    python -m bench.run --quick         # everything but the 2-minute rate-limited pass
    python -m bench.run --only 1,5      # chosen scenarios

Traffic goes to 127.0.0.1 only: nginx and the simulator are started here, on free ports.
"""

from __future__ import annotations

import argparse
import compileall
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import BENCH_DIR, ROOT

SCENARIOS = {
    1: "raw throughput",
    2: "latency-bound",
    3: "rate-limited",
    4: "catalogue scale",
    5: "work per image (profile)",
}
REQUIRED = ("nginx", "aria2c", "wrk")


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def snapshot_src(dest: Path) -> str:
    """Copy src/zoho_image_sync to ``dest`` and put it first on the import path.

    Other people edit src/ while a run lasts (minutes): every process of one run must
    measure the same code. The copy goes first on PYTHONPATH (children: zoho-image-sync,
    the simulator) and on sys.path (this process: the site generator, State saves).
    Returns a short sha256 of the copied sources, to name what was measured.
    """
    pkg = dest / "zoho_image_sync"
    shutil.copytree(
        ROOT / "src" / "zoho_image_sync", pkg, ignore=shutil.ignore_patterns("__pycache__")
    )
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(dest)).encode() + b"\0" + f.read_bytes())
    # Bytecode, as a wheel install has it (pip compiles at install time). Without it
    # every process compiles the package again (~40 ms of each start), wherever
    # PYTHONDONTWRITEBYTECODE is set, as it is on these machines. The Python reference
    # clients in bench/ get the same treatment.
    for tree in (pkg, ROOT / "bench"):
        if not compileall.compile_dir(tree, quiet=1):
            raise RuntimeError(f"could not byte-compile {tree}")
    if "zoho_image_sync" in sys.modules:
        raise RuntimeError("zoho_image_sync was imported before the snapshot was taken")
    sys.path.insert(0, str(dest))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(dest), str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    return h.hexdigest()[:12]


def environment(command: str, reps: int, snapshot: str) -> dict[str, str]:
    """Machine and versions for the RESULTS.md header."""
    import aiohttp

    import zoho_image_sync

    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    rev = _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    py_spy = Path(sys.executable).parent / "py-spy"
    return {
        "command": command,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": str(os.cpu_count()),
        "cpu_model": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "zis": f"{zoho_image_sync.__version__} (git {rev}"
        + (" + uncommitted changes in src/" if dirty else "")
        + f"; measured from a byte-compiled copy of src/ taken at the start, sha256 {snapshot}…)",
        "nginx": _version(["nginx", "-v"]).replace("nginx version: ", ""),
        "aria2c": _version(["aria2c", "--version"]),
        "wrk": _version(["wrk", "-v"]).split(" Copyright")[0],
        "py_spy": _version([str(py_spy), "--version"]) if py_spy.exists() else "not installed",
        "reps": str(reps),
        "duration": "",
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="skip scenario 3 (rate-limited)")
    p.add_argument("--only", default="", help="comma-separated scenario numbers, e.g. 1,5")
    p.add_argument("--reps", type=int, default=3, help="repetitions per scenario (3)")
    p.add_argument("--images", type=int, default=5000, help="scenario 1 images (5000)")
    p.add_argument("--latency-images", type=int, default=1000, help="scenario 2 images (1000)")
    p.add_argument("--rate-reps", type=int, default=1, help="scenario 3 passes (1)")
    p.add_argument("--rate-per-minute", type=int, default=1200)
    p.add_argument("--rate-items", type=int, default=3000, help="scenario 3 catalogue (3000)")
    p.add_argument("--rate-with-images", type=int, default=2700)
    p.add_argument("--scale", default="10000,100000", help="scenario 4 catalogue sizes")
    p.add_argument("--out", default=str(BENCH_DIR / "RESULTS.md"))
    p.add_argument("--keep", action="store_true", help="keep the work folders (and logs)")
    args = p.parse_args(argv)

    missing = [tool for tool in REQUIRED if shutil.which(tool) is None]
    if missing:
        sys.stderr.write(f"missing tools: {', '.join(missing)} (make bench installs them)\n")
        return 2
    wanted = [int(x) for x in args.only.split(",") if x.strip()] or list(SCENARIOS)
    if args.quick:
        wanted = [s for s in wanted if s != 3]
    if not Path("/dev/shm").is_dir():
        sys.stderr.write("/dev/shm (tmpfs) is needed for the contenders' output\n")
        return 2
    command = os.environ.get("BENCH_COMMAND") or shlex.join(
        ["python", "-m", "bench.run", *(argv if argv is not None else sys.argv[1:])]
    )
    tmpfs = Path(tempfile.mkdtemp(prefix="zis-bench-", dir="/dev/shm"))
    disk = Path(tempfile.mkdtemp(prefix="zis-bench-", dir="/var/tmp"))
    snapshot = snapshot_src(disk / "src")
    env = environment(command, args.reps, snapshot)
    # Imported only now, so that they (and zoho_image_sync) come from the snapshot.
    from . import scenarios
    from .report import render

    # nginx's worker runs as nobody: it must be able to read the generated site.
    disk.chmod(0o755)
    started = time.monotonic()

    def log(msg: str) -> None:
        sys.stderr.write(f"[{time.monotonic() - started:7.1f}s] {msg}\n")
        sys.stderr.flush()

    ctx = scenarios.Context(
        tmpfs=tmpfs,
        disk=disk,
        reps=args.reps,
        images=args.images,
        latency_images=args.latency_images,
        rate_reps=args.rate_reps,
        rate_per_minute=args.rate_per_minute,
        rate_items=args.rate_items,
        rate_with_images=args.rate_with_images,
        scale_items=tuple(int(x) for x in args.scale.split(",")),
        log=log,
    )
    results: dict[str, Any] = {}
    log(f"work folders: {tmpfs} (tmpfs), {disk} (ext4)")
    try:
        for number in sorted(wanted):
            log(f"scenario {number}: {SCENARIOS[number]}")
            if number == 1:
                results["raw"] = scenarios.raw_throughput(ctx)
            elif number == 2:
                results["latency"] = scenarios.latency_bound(ctx)
            elif number == 3:
                results["rate"] = scenarios.rate_limited(ctx)
            elif number == 4:
                results["scale"] = scenarios.catalogue_scale(ctx)
            elif number == 5:
                results["profile"] = scenarios.profile(ctx, BENCH_DIR)
    finally:
        if args.keep:
            log(f"kept {tmpfs} and {disk}")
        else:
            shutil.rmtree(tmpfs, ignore_errors=True)
            shutil.rmtree(disk, ignore_errors=True)
    minutes, seconds = divmod(int(time.monotonic() - started), 60)
    env["duration"] = f"{minutes} min {seconds} s"
    out = Path(args.out)
    out.with_name("results.json").write_text(
        json.dumps({"environment": env, "results": results}, indent=1, default=str) + "\n"
    )
    out.write_text(render(env, results))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
