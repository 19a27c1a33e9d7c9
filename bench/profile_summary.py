"""Turn py-spy's collapsed stacks (``--format raw --threads``) into a readable summary.

Each input line is ``thread (TID): NAME;frame;frame;... COUNT`` with frames written
``function (file:line)``, root first; with ``--subprocesses`` a ``process PID:"CMD";``
comes first for each process from the root down (the image writer process is labelled
as such). py-spy leaves idle threads out by default, so the samples are time on the CPU
(or runnable); at ``rate`` samples per second a sample is ``1/rate`` s of one thread's
time.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?):(?P<line>\d+)\)$")


def _thread_group(name: str) -> str:
    name = name.strip()
    if name.startswith("asyncio_"):
        return "to_thread pool (asyncio_N)"
    return re.sub(r"\d+", "N", name)


def _func(frame: str) -> str:
    m = FRAME.match(frame)
    return f"{m['func']} ({m['file']})" if m else frame


def _area(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    if path.startswith("zoho_image_sync/"):
        return path.removesuffix(".py")
    top = path.split("/", 1)[0]
    return top.removesuffix(".py") if "/" in path else path.removesuffix(".py")


def parse(text: str) -> list[tuple[str, list[str], int]]:
    """(thread group, frames root-first, samples) per line.

    py-spy sometimes misses a thread's name (``thread (TID)`` alone): the name seen on
    another line for the same TID is used.
    """
    rows: list[tuple[str, str, list[str], int]] = []
    names: dict[str, str] = {}
    for line in text.splitlines():
        head, _, count = line.rpartition(" ")
        if not head or not count.isdigit():
            continue
        parts = head.split(";")
        writer = False
        while parts[0].startswith("process ") and len(parts) > 1:
            # --subprocesses: 'process PID:"CMDLINE"' for each process from the root down.
            writer = "durable.py" in parts[0]
            parts = parts[1:]
        tid, _, name = parts[0].partition(":")
        if writer:  # the image writer process: one thread, which py-spy leaves unnamed
            name = "image writer process"
        if name.strip():
            names[tid] = name.strip()
        rows.append((tid, name.strip(), parts[1:], int(count)))
    return [
        (_thread_group(name or names.get(tid, "unnamed thread")), frames, count)
        for tid, name, frames, count in rows
    ]


def summarise(text: str, images: int, rate: float = 250.0, top: int = 25) -> tuple[str, list[Any]]:
    """The PROFILE.txt text, and the top self-time functions for RESULTS.md."""
    stacks = parse(text)
    total = sum(c for _, _, c in stacks)
    if total == 0:
        return "no samples\n", []
    threads: Counter[str] = Counter()
    self_func: Counter[str] = Counter()
    self_line: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    for thread, frames, count in stacks:
        threads[thread] += count
        if not frames:
            continue
        leaf = frames[-1]
        self_func[_func(leaf)] += count
        self_line[leaf] += count
        areas[_area(leaf)] += count
        for f in {_func(f) for f in frames}:
            incl[f] += count
        # Which of our own functions is closest to the leaf: "our code that led here".
        if any("importlib._bootstrap" in f for f in frames):
            ours["(module imports at start-up)"] += count
            continue
        for f in reversed(frames):
            if "zoho_image_sync/" in f:
                ours[_func(f)] += count
                break
        else:
            ours["(outside zoho_image_sync frames)"] += count

    def ms_per_1k(samples: int) -> float:
        return samples / rate / max(images, 1) * 1e6

    def table(title: str, counter: Counter[str], n: int) -> list[str]:
        lines = [
            "",
            title,
            f"{'samples':>8} {'share':>6} {'ms/1k img':>10}  what",
        ]
        for key, c in counter.most_common(n):
            lines.append(f"{c:>8} {100 * c / total:>5.1f}% {ms_per_1k(c):>10.1f}  {key}")
        return lines

    lines = [
        "py-spy profile of one `zoho-image-sync once` pass (scenario 1: nginx on loopback,",
        f"limits off, tmpfs output). {images} images, {total} samples at {rate:g} Hz, idle",
        f"threads excluded: {total / rate:.2f} thread-seconds on the CPU, "
        f"{ms_per_1k(total):.0f} ms per 1,000 images.",
        "Shares are of all non-idle samples; 'ms/1k img' is thread time per 1,000 images.",
    ]
    lines += table("By thread", threads, 10)
    lines += table("By area (module of the innermost frame)", areas, 20)
    lines += table("Nearest zoho_image_sync frame (our code that led to the cost)", ours, top)
    lines += table("Self time by function", self_func, top)
    lines += table("Self time by line", self_line, top)
    lines += table("Inclusive time by function", incl, top + 10)
    summary = [
        {
            "what": key,
            "share": 100 * c / total,
            "ms_per_1k": ms_per_1k(c),
        }
        for key, c in ours.most_common(12)
    ]
    areas_top = [
        {"what": key, "share": 100 * c / total, "ms_per_1k": ms_per_1k(c)}
        for key, c in areas.most_common(12)
    ]
    threads_top = [
        {"what": key, "share": 100 * c / total, "ms_per_1k": ms_per_1k(c)}
        for key, c in threads.most_common(5)
    ]
    self_top = [
        {"what": key, "share": 100 * c / total, "ms_per_1k": ms_per_1k(c)}
        for key, c in self_func.most_common(12)
    ]
    return "\n".join(lines) + "\n", [
        {"ours": summary, "areas": areas_top, "threads": threads_top, "self": self_top}
    ]
