"""Command line: ``zoho-image-sync [-c CONFIG] COMMAND``; results on stdout as one JSON document."""

from __future__ import annotations

import gc

# No garbage collection while the imports below allocate (~200 ms of them, aiohttp's
# included): they leave nothing cyclic to free, and the collections cost 20-40 ms of every
# start. Enabled again right after them, with what they built frozen (gc.freeze): modules,
# classes and functions live as long as the process, so no collection ever traverses them
# again, neither the first one (~13 ms), nor those during a pass, nor the last at exit
# (~22 ms). Cycles made after this are collected as before.
gc.disable()

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import io
import json
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from . import __version__
from .config import Config, load
from .errors import (
    EX_CONFIG,
    EX_FAILED,
    EX_OK,
    EX_TEMPFAIL,
    BudgetExhausted,
    ConfigError,
    SyncError,
    exit_code,
)
from .export import erp_records, merge, write_export
from .logsetup import Redactor, configure
from .loop import run as run_loop
from .service import Daemon, Service, failed_report, storage_error
from .state import State, StateCorrupt
from .storage import write_bytes_atomic

gc.freeze()
gc.enable()

log = structlog.get_logger("zoho_image_sync")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate for tests and --help)."""
    p = argparse.ArgumentParser(
        prog="zoho-image-sync",
        description="Mirror Zoho Inventory item images to disk, within Zoho's limits.",
    )
    p.add_argument("-c", "--config", default="config.toml", help="config file (./config.toml)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="the daemon: a pass every sync.interval_seconds")
    sub.add_parser("once", help="one full pass, then exit; prints the pass report")
    au = sub.add_parser("audit", help="page the catalogue only: which items have an image")
    au.add_argument(
        "--list",
        dest="list_file",
        default=None,
        help="also write the ids without an image to this CSV file",
    )
    sub.add_parser("status", help="counts from the state file, no network")
    ex = sub.add_parser("export", help="write the ERP records (JSON) atomically")
    ex.add_argument("--out", required=True, help="output file")
    ex.add_argument("--format", choices=("json", "csv"), default="json")
    ex.add_argument(
        "--merge",
        default=None,
        metavar="FILE",
        help="an ERP records file (JSON array keyed by zoho_item_id): written to "
        "--out with only the image fields set or cleared",
    )
    sim = sub.add_parser("simulate", help="serve the built-in Zoho simulator on loopback")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8900)
    sim.add_argument("--items", type=int, default=2205)
    sim.add_argument("--with-images", type=int, default=None)
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument("--per-minute", type=int, default=100, help="0 = unlimited")
    sim.add_argument("--window-seconds", type=float, default=60.0)
    sim.add_argument("--max-concurrent", type=int, default=10, help="0 = unlimited")
    sim.add_argument("--daily-limit", type=int, default=0, help="0 = unlimited")
    sim.add_argument("--token-ttl", type=int, default=3600)
    demo = sub.add_parser("demo", help="simulator + once: the zero-credential first run")
    demo.add_argument("--dir", default=None, help="where to write (default: as the config says)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    redactor = Redactor()
    configure("info", "auto", redactor)
    handlers: dict[str, Callable[[argparse.Namespace, Redactor], int]] = {
        "once": cmd_once,
        "run": cmd_run,
        "audit": cmd_audit,
        "status": cmd_status,
        "export": cmd_export,
        "simulate": cmd_simulate,
        "demo": cmd_demo,
    }
    try:
        return handlers[args.command](args, redactor)
    except ConfigError as exc:
        log.error("configuration unusable", key=exc.key, error=exc.why)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


def emit(doc: Any) -> None:
    """Write the command's single JSON document to stdout."""
    sys.stdout.write(json.dumps(doc, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _load(
    args: argparse.Namespace, redactor: Redactor, env: Mapping[str, str] | None = None
) -> Config:
    cfg = load(Path(args.config), env=env)
    redactor.add(*cfg.credentials.secrets())
    configure(cfg.log.level, cfg.log.format, redactor)
    return cfg


def run_async(
    coro: Coroutine[Any, Any, Any],
    on_stop: Callable[[], None] | None,
    also: Mapping[signal.Signals, Callable[[], None]] | None = None,
) -> Any:
    """Run ``coro``; SIGTERM/SIGINT call ``on_stop`` once, a second SIGINT forces exit.

    Handlers only record intent (uvicorn's handle_exit); the loops act on it. ``also``
    adds handlers for other signals (``run``: SIGHUP reloads).
    """

    async def wrapper() -> Any:
        loop = asyncio.get_running_loop()
        for sig, handler in (also or {}).items():
            loop.add_signal_handler(sig, handler)
        if on_stop is not None:
            interrupts = {"n": 0}

            def on_signal(sig: signal.Signals) -> None:
                # Only a second SIGINT (an operator's second Ctrl-C) forces: SIGTERM from
                # systemd then one Ctrl-C still drains and saves.
                if sig == signal.SIGINT:
                    interrupts["n"] += 1
                    if interrupts["n"] > 1:
                        log.warning("second interrupt: exiting now")
                        os._exit(130)
                on_stop()

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_signal, sig)
        return await coro

    return run_loop(wrapper())


def _with_progress(service: Service, coro: Coroutine[Any, Any, Any]) -> Coroutine[Any, Any, Any]:
    """On a terminal, show live progress on stderr while ``coro`` runs."""
    if not sys.stderr.isatty():
        return coro

    async def runner() -> Any:
        async def show() -> None:
            while True:
                await asyncio.sleep(1.0)
                p = service.current_pass
                if p is None:
                    continue
                d = p.progress.as_dict()
                eta = f"{d['eta_seconds']:.0f}s" if d["eta_seconds"] is not None else "?"
                sys.stderr.write(
                    f"\r  items {d['items_seen']}  images {d['images_done']}/{d['images_queued']}"
                    f"  {d['images_per_second']:.1f}/s  eta {eta}   "
                )
                sys.stderr.flush()

        task = asyncio.create_task(show())
        try:
            return await coro
        finally:
            task.cancel()
            sys.stderr.write("\n")

    return runner()


def cmd_once(args: argparse.Namespace, redactor: Redactor) -> int:
    """``once``; its stdout is a pass report even when the configuration is unusable."""
    try:
        cfg = _load(args, redactor)
    except ConfigError as exc:
        log.error("configuration unusable", key=exc.key, error=exc.why)
        emit(failed_report(str(exc)))
        return EX_CONFIG
    return _run_once(cfg, redactor)


def _run_once(cfg: Config, redactor: Redactor) -> int:
    service = Service(cfg, redactor=redactor)
    report, code = run_async(_with_progress(service, service.once()), service.handle_term)
    emit(report)
    return int(code)


def cmd_run(args: argparse.Namespace, redactor: Redactor) -> int:
    """``run``: the daemon (see service.py), until SIGTERM/SIGINT; SIGHUP reloads."""
    daemon = Daemon(_load(args, redactor), redactor=redactor)
    return int(run_async(daemon.serve(), daemon.handle_term, {signal.SIGHUP: daemon.handle_hup}))


def cmd_audit(args: argparse.Namespace, redactor: Redactor) -> int:
    """``audit``: page the catalogue, download nothing."""
    cfg = _load(args, redactor)
    service = Service(cfg, redactor=redactor)
    list_failed: list[str] = []

    async def go() -> dict[str, Any]:
        await service.startup(readonly=True)
        try:
            assert service.client is not None
            total = with_image = 0
            by_type: Counter[str] = Counter()
            missing: list[tuple[str, str, str]] = []
            async for _page, items in service.pages():
                for item in items:
                    total += 1
                    if item.has_zoho_image or item.image_url or item.item_id in service.url_map:
                        with_image += 1
                        by_type[item.image_type or "unknown"] += 1
                    else:
                        missing.append((item.item_id, item.sku, item.name))
            if args.list_file:
                buf = io.StringIO()
                w = csv.writer(buf, lineterminator="\n")
                w.writerow(["zoho_item_id", "sku", "name"])
                w.writerows(missing)
                try:
                    write_bytes_atomic(
                        Path(args.list_file), buf.getvalue().encode("utf-8"), only_over_files=True
                    )
                except OSError as exc:  # the audit itself is still printed
                    log.error("cannot write the list", path=args.list_file, error=exc.strerror)
                    list_failed.append(args.list_file)
            return {
                "total": total,
                "with_image": with_image,
                "without_image": total - with_image,
                "by_type": dict(sorted(by_type.items())),
                "api_requests": service.client.requests_sent,
            }
        finally:
            await service.shutdown()

    try:
        emit(run_async(go(), None))
    except BudgetExhausted as exc:
        log.error("audit stopped: the daily request budget is spent", error=str(exc))
        return EX_TEMPFAIL
    except SyncError as exc:
        log.error("audit failed", error=str(exc))
        return exit_code(exc)
    return EX_FAILED if list_failed else EX_OK


def _read_state(cfg: Config) -> State:
    try:
        with storage_error("storage.state_file", cfg.storage.state_file):
            return State.read(cfg.storage.state_file, cfg.storage.images_dir)
    except StateCorrupt as exc:
        raise ConfigError("storage.state_file", str(exc)) from None


def cmd_status(args: argparse.Namespace, redactor: Redactor) -> int:
    """``status``: the state file's counts, no network."""
    cfg = _load(args, redactor)
    state = _read_state(cfg)
    emit({"items": state.counts(), "last_pass": state.last_pass})
    return EX_OK


def cmd_export(args: argparse.Namespace, redactor: Redactor) -> int:
    """``export --out FILE [--format json|csv] [--merge ERP_FILE]``."""
    cfg = _load(args, redactor)
    state = _read_state(cfg)
    records = erp_records(state, cfg.storage.images_dir)
    out = Path(args.out)
    result: dict[str, Any] = {"written": len(records), "path": str(out)}
    try:
        if args.merge:
            if args.format != "json":
                raise ConfigError("--format", "--merge writes the ERP's JSON; use --format json")
            try:
                existing = json.loads(Path(args.merge).read_bytes())
                merged, matched, unknown = merge(existing, records)
            except (OSError, ValueError) as exc:
                log.error("cannot merge", path=args.merge, error=str(exc))
                return EX_FAILED
            write_export(merged, out, "json")
            result = {
                "written": len(merged),
                "path": str(out),
                "matched": matched,
                "unknown": unknown,
            }
        else:
            write_export(records, out, args.format)
    except OSError as exc:
        log.error("export failed", path=str(out), error=exc.strerror)
        return EX_FAILED
    emit(result)
    return EX_OK


def cmd_simulate(args: argparse.Namespace, redactor: Redactor) -> int:
    """``simulate``: serve the simulator until SIGTERM/SIGINT."""
    from .simulator import SimConfig, run_simulator

    sim_cfg = SimConfig(
        seed=args.seed,
        items=args.items,
        with_images=args.with_images,
        per_minute=args.per_minute or None,
        window_seconds=args.window_seconds,
        max_concurrent=args.max_concurrent or None,
        daily_limit=args.daily_limit or None,
        token_ttl=args.token_ttl,
    )

    async def go() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await run_simulator(sim_cfg, args.host, args.port, ready=lambda url: emit(url))

    run_loop(go())
    return EX_OK


def _on_loopback(url: str) -> bool:
    """Whether ``url`` names this machine (a simulator), not Zoho."""
    host = urlsplit(url).hostname if url else None
    return host in ("127.0.0.1", "localhost", "::1")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def cmd_demo(args: argparse.Namespace, redactor: Redactor) -> int:
    """``demo``: start the simulator in-process and run ``once`` against it."""
    from .simulator import (
        DEMO_CLIENT_ID,
        DEMO_CLIENT_SECRET,
        DEMO_REFRESH_TOKEN,
        SimConfig,
        Simulator,
    )

    # Always the simulator's own credentials: real ones (environment, systemd credentials)
    # are never sent, not even to the local simulator.
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    env["ZOHO_CLIENT_ID"] = DEMO_CLIENT_ID
    env["ZOHO_CLIENT_SECRET"] = DEMO_CLIENT_SECRET
    env["ZOHO_REFRESH_TOKEN"] = DEMO_REFRESH_TOKEN
    root: Path | None = Path(args.dir).resolve() if args.dir else None
    cfg = _load(args, redactor, env) if Path(args.config).exists() else None
    if cfg is not None and not _on_loopback(cfg.zoho.accounts_url):
        # A configuration for the real Zoho: its images and state are a production mirror,
        # which a simulated catalogue must never touch (nor remove from), and its limits
        # are Zoho's (a 16-minute demo). The demo runs on its own settings instead.
        if root is None:
            root = Path("demo-data").resolve()
        log.warning(
            "the configuration is for Zoho itself: demo leaves it and its storage alone",
            config=str(args.config),
            dir=str(root),
        )
        cfg = None
    if cfg is None:
        cfg = Config.from_mapping(
            {"limits": {"requests_per_minute": 6000, "daily_request_budget": 100_000}},
            Path.cwd(),
            env=env,
        )
    if root is not None:
        cfg = dataclasses.replace(
            cfg,
            storage=dataclasses.replace(
                cfg.storage, images_dir=root / "images" / "item", state_file=root / "state.json"
            ),
        )
    port = urlsplit(cfg.zoho.accounts_url).port if cfg.zoho.accounts_url else None
    if port is None or not _port_free("127.0.0.1", port):
        port = 0
    sim = Simulator(
        SimConfig(
            per_minute=cfg.limits.requests_per_minute,
            max_concurrent=cfg.limits.max_concurrent_requests,
        )
    )

    async def go() -> tuple[dict[str, Any], int]:
        base = await sim.start("127.0.0.1", port)
        log.info("simulator serving", url=base)
        local = dataclasses.replace(
            cfg,
            zoho=dataclasses.replace(cfg.zoho, accounts_url=base, api_url=f"{base}/inventory/v1"),
        )
        service = Service(local, redactor=redactor)
        service_ref["s"] = service
        try:
            t0 = time.monotonic()
            report, code = await _with_progress(service, service.once())
            log.info(
                "demo pass finished",
                seconds=round(time.monotonic() - t0, 2),
                images_dir=str(local.storage.images_dir),
                simulator_requests=sim.stats()["api_requests"],
                tokens_minted=sim.stats()["tokens_minted"],
            )
            return report, code
        finally:
            await sim.stop()

    service_ref: dict[str, Service] = {}

    def stop() -> None:
        if "s" in service_ref:
            service_ref["s"].handle_term()

    try:
        report, code = run_async(go(), stop)
    except SyncError as exc:
        emit(failed_report(str(exc)))
        return EX_FAILED
    emit(report)
    return int(code)


if __name__ == "__main__":
    raise SystemExit(main())
