"""The lifecycle: one class, named phases (startup, passes, shutdown), signals as intents.

Signal handlers only record what was asked (``handle_term``, ``handle_hup``); the
loops act on it. Tests call those methods directly instead of sending signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from .auth import TokenManager
from .config import Config
from .config import load as load_config
from .errors import (
    EX_CONFIG,
    EX_FAILED,
    EX_OK,
    EX_TEMPFAIL,
    ConfigError,
    TokenUnavailable,
    exit_code,
)
from .limits import ApiGate, DailyBudget, HostGate
from .logsetup import Redactor
from .logsetup import configure as configure_logging
from .metrics import Metrics
from .notify import Notifier
from .pager import Pages, load_url_map, zoho_pages
from .sources import file_pages
from .state import State, StateCorrupt, read_json_or_none, rebuild_from_disk
from .storage import sweep_temporaries, write_bytes_atomic
from .sync import PassStats, SyncPass
from .zoho import ZohoClient

log = structlog.get_logger(__name__)

# Items modified a little before the last complete pass started are asked for again:
# clocks differ, and an edit during that pass may have been listed before it happened.
INCREMENTAL_OVERLAP_SECONDS = 600.0


@contextlib.contextmanager
def storage_error(key: str, path: Path) -> Iterator[None]:
    """An OSError on a configured path (a file where a folder should be, no permission)
    becomes a ConfigError naming the key: exit 78 with a message, not a traceback."""
    try:
        yield
    except OSError as exc:
        where = exc.filename if exc.filename is not None else path
        why = exc.strerror or str(exc)
        if exc.errno in (errno.EEXIST, errno.ENOTDIR):
            why = "a file is where a folder should be"
        raise ConfigError(key, f"cannot use {where}: {why}") from None


class InstanceLock:
    """One instance per state folder: an flock held for the life of the process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(
                "storage.state_file",
                f"another zoho-image-sync (pid {holder}) is using {self.path.parent}; "
                "two instances on one state would corrupt it",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        """Drop the lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Service:
    """Owns the session, the state and the pass; ``once()`` and ``serve()`` drive it."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics | None = None,
        redactor: Redactor | None = None,
        window_seconds: float = 60.0,
        window_margin: float | None = None,
    ) -> None:
        self.config = config
        self.window_seconds = window_seconds
        # Half a second per minute of window: room for latency jitter, <1% of the rate.
        self.window_margin = window_seconds / 120 if window_margin is None else window_margin
        self.metrics = metrics or Metrics()
        self.redactor = redactor or Redactor()
        self.redactor.add(*config.credentials.secrets())
        self.stop_event = asyncio.Event()
        self.current_pass: SyncPass | None = None
        self.last_report: dict[str, Any] | None = None
        self._lock = InstanceLock(config.lock_file)
        self._session: aiohttp.ClientSession | None = None
        self.state: State | None = None
        self.tokens: TokenManager | None = None
        self.client: ZohoClient | None = None
        self.gate: ApiGate | None = None
        self.url_map: dict[str, str] = {}
        self.pass_failed: str | None = None
        self.budget_resume_at: float | None = None
        self.reload_ok = True
        self.config_path = config.path
        self.notifier = Notifier()
        self.readonly = False
        self._wake = asyncio.Event()
        self._hup = asyncio.Event()
        self._next_pass_at = 0.0
        self._last_pass_end = 0.0
        self._interval_based = False

    # -- intents -----------------------------------------------------------

    def handle_term(self) -> None:
        """Record a stop request; the loops wind down."""
        if not self.stop_event.is_set():
            log.info("stop requested: finishing in-flight downloads")
        self.stop_event.set()
        self._wake.set()

    def handle_hup(self) -> None:
        """Record a reload request; the reload task acts on it."""
        self._hup.set()

    # -- views (HTTP, notify) ------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        """(ready, why) for /readyz."""
        if self.tokens is None or not self.tokens.held:
            why = self.tokens.last_error if self.tokens and self.tokens.last_error else None
            return False, why or "no access token held yet"
        if self.pass_failed:
            return False, f"the last pass failed: {self.pass_failed}"
        return True, "ok"

    def refresh_gauges(self) -> None:
        """Bring scrape-time gauges up to date."""
        if self.gate is not None:
            self.metrics.daily_budget_remaining.set(self.gate.budget.remaining)
        if self.state is not None:
            self.metrics.set_item_counts(self.state.counts())
        self.metrics.ready.set(1 if self.readiness()[0] else 0)

    def state_view(self) -> dict[str, Any]:
        """The /state document; the token itself never appears."""
        p = self.current_pass
        return {
            "items": self.state.counts() if self.state else None,
            "pass": p.progress.as_dict() if p is not None else None,
            "last_report": self.last_report,
            "daily_budget_remaining": self.gate.budget.remaining if self.gate else None,
            "budget_resumes_at": self.budget_resume_at,
            "token_expires_at": round(self.tokens.expires_at, 3)
            if self.tokens and self.tokens.held
            else None,
            "token_error": self.tokens.last_error if self.tokens else None,
            "workers": self.config.download.workers,
            "config_last_reload_successful": self.reload_ok,
        }

    # -- phases ------------------------------------------------------------

    async def startup(self, readonly: bool = False) -> None:
        """Lock, sweep crash leftovers, load state, build the client.

        ``readonly`` (audit): no lock, no sweep, no journal, no save, so it can run beside
        a daemon without touching the daemon's files (the token cache excepted).
        """
        cfg = self.config
        self.readonly = readonly
        if cfg.source.kind == "zoho":
            cfg.credentials.require()
        state_file, images_dir = cfg.storage.state_file, cfg.storage.images_dir
        if readonly:
            try:
                with storage_error("storage.state_file", state_file):
                    self.state = State.read(state_file, images_dir)
            except StateCorrupt:
                self.state = State(state_file)
        else:
            with storage_error("storage.state_file", state_file):
                self._lock.acquire()
            with storage_error("storage.images_dir", images_dir):
                images_dir.mkdir(parents=True, exist_ok=True)
                swept = sweep_temporaries(images_dir)
            with storage_error("storage.state_file", state_file):
                swept += sweep_temporaries(state_file.parent)
                if swept:
                    log.info("removed temporaries left by an earlier crash", count=swept)
                self.state = State.open(state_file, images_dir)
            self.state.journaling = True
            self.state.before_save = self._before_save
        if self.state.recovered_from is not None:
            adopted = await asyncio.to_thread(rebuild_from_disk, self.state, cfg.storage.images_dir)
            await self.state.save()
            log.error(
                "state rebuilt from the images on disk; they will be verified by download",
                adopted=adopted,
                corrupt_copy=str(self.state.recovered_from),
            )
        self.last_report = self.state.last_pass
        self.url_map = load_url_map(cfg.source.url_map)
        if cfg.source.kind == "file" and not Path(cfg.source.items_file).is_file():
            raise ConfigError("source.items_file", f"not a file: {cfg.source.items_file}")
        budget_meta = self.state.meta.get("budget") or {}
        budget = DailyBudget(
            cfg.limits.daily_request_budget,
            spent=int(budget_meta.get("spent", 0)),
            day=str(budget_meta.get("day", "")),
            reset_hour=cfg.limits.daily_budget_reset_hour_utc,
        )
        self.gate = ApiGate(
            cfg.limits.requests_per_minute,
            cfg.limits.max_concurrent_requests,
            budget,
            window=self.window_seconds,
            margin=self.window_margin,
        )
        recent = read_json_or_none(self._window_file)
        if isinstance(recent, list):
            self.gate.window.restore([t for t in recent if isinstance(t, int | float)], time.time())
        hosts = HostGate(cfg.limits.per_host_requests_per_second, cfg.limits.per_host_concurrency)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": "zoho-image-sync"},
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        # aiohttp silently resends an idempotent request once when a kept-alive connection
        # drops. Zoho counts that arrival, our gate would not: every send must pass the gate.
        if hasattr(self._session, "_retry_connection"):
            self._session._retry_connection = False
        self.tokens = TokenManager(
            self._session,
            cfg.zoho,
            cfg.credentials,
            cfg.token_file,
            self.metrics,
            timeout=cfg.download.timeout_seconds,
            wall=time.time,
            on_token=self.redactor.add_token,
        )
        self.client = ZohoClient(self._session, cfg, self.tokens, self.gate, hosts, self.metrics)
        last = self.state.last_pass
        if last and last.get("status") in ("success", "partial") and last.get("finished_at"):
            # Survive restarts: dashboards and alerts read the last success from here.
            self.metrics.last_pass_success.set(float(last["finished_at"]))
            self.metrics.last_pass_images.set(last["statistics"].get("images_downloaded", 0))
        self.metrics.workers.set(cfg.download.workers)

    async def run_pass(self, allow_incremental: bool = False) -> dict[str, Any]:
        """One pass; returns its report. Incremental (modified items only) when allowed/due."""
        assert self.client is not None and self.state is not None and self.gate is not None
        client = self.client
        cfg = self.config
        meta = self.state.meta
        since = self._incremental_since() if allow_incremental else None
        started = time.time()

        def finishing(p: SyncPass, report: dict[str, Any]) -> None:
            if not (p.complete and cfg.source.kind == "zoho"):
                return
            if since is None:
                meta["last_full_pages"] = p.progress.pages_done
                meta["passes_since_full"] = 0
            else:
                meta["passes_since_full"] = int(meta.get("passes_since_full", 0)) + 1
                saved = max(int(meta.get("last_full_pages", 0)) - p.progress.pages_done, 0)
                report["incremental"] = {
                    "modified_since": round(since, 3),
                    "pages": p.progress.pages_done,
                    "api_requests_saved": saved,
                }
            meta["last_complete_pass_started_at"] = started

        p = SyncPass(
            pages=lambda: self.pages(since),
            client=client,
            state=self.state,
            metrics=self.metrics,
            images_dir=cfg.storage.images_dir,
            url_map=self.url_map,
            workers=cfg.download.workers,
            shutdown_timeout=cfg.sync.shutdown_timeout_seconds,
            stop=self.stop_event,
            full_scan=since is None,
            finishing=finishing,
        )
        self.current_pass = p
        try:
            report = await p.run()
        except BaseException:
            # The pass did not reach its final save: shutdown must still write the budget
            # spent and the rate window, or a restart would under-count today's requests.
            self.state.dirty += 1
            raise
        finally:
            self.current_pass = None
        self.last_report = report
        if p.fatal is not None:
            report["exit_code"] = exit_code(p.fatal)
        return report

    def pages(self, since: float | None = None) -> Pages:
        """The catalogue's pages from the configured source; Zoho's only those modified
        since ``since`` (epoch seconds) when given."""
        cfg = self.config
        if cfg.source.kind == "file":
            return file_pages(Path(cfg.source.items_file))
        assert self.client is not None
        if since is None:
            return zoho_pages(self.client)
        extra = {
            "last_modified_time": time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(since)),
            "sort_column": "last_modified_time",
            "sort_order": "A",
        }
        return zoho_pages(self.client, extra=extra)

    def _incremental_since(self) -> float | None:
        """The modified-since time for an incremental pass, or None when a full scan is due."""
        assert self.state is not None
        meta = self.state.meta
        last = meta.get("last_complete_pass_started_at")
        every = self.config.sync.full_rescan_every
        if self.config.source.kind != "zoho" or not isinstance(last, int | float) or every <= 1:
            return None
        if int(meta.get("passes_since_full", 0)) + 1 >= every:
            return None
        return float(last) - INCREMENTAL_OVERLAP_SECONDS

    def _before_save(self) -> dict[Path, bytes]:
        """Budget into the state's meta; the rate window beside it, in the save's thread."""
        if self.state is None or self.gate is None:
            return {}
        b = self.gate.budget
        self.state.meta["budget"] = {"day": b.day, "spent": b.spent}
        return {self._window_file: self._window_bytes()}

    @property
    def _window_file(self) -> Path:
        return self.config.storage.state_file.parent / "ratewindow.json"

    def _save_window(self) -> None:
        """The rolling window outlives the process: `audit` then `once`, or a restart,
        must not put more than the limit into one minute between them."""
        if self.gate is None:
            return
        try:
            write_bytes_atomic(self._window_file, self._window_bytes(), mode=0o600)
        except OSError as exc:
            log.warning("could not save the rate window", error=exc.strerror)

    def _window_bytes(self) -> bytes:
        assert self.gate is not None
        return json.dumps(self.gate.window.snapshot(time.time())).encode()

    async def shutdown(self) -> None:
        """Flush state, close the session, release the lock."""
        try:
            if self.readonly:
                self._save_window()
            elif self.state is not None and self.state.dirty:
                # A pass saves at its end (window and budget included): only what came
                # after it (a write finishing past a stop's deadline) is left to save.
                await self.state.save()
        finally:
            if self._session is not None:
                await self._session.close()
                self._session = None
            if self.state is not None:
                self.state.close()
            self._lock.release()

    # -- drivers -----------------------------------------------------------

    async def once(self) -> tuple[dict[str, Any], int]:
        """``once``: one pass, then exit; returns (report, exit code)."""
        try:
            await self.startup()
        except ConfigError as exc:
            await self.shutdown()
            return failed_report(str(exc)), EX_CONFIG
        try:
            report = await self.run_pass()
        except Exception as exc:
            log.exception("the pass failed unexpectedly")
            report = failed_report(f"internal error: {exc!r}")
            report["exit_code"] = EX_FAILED
        finally:
            await self.shutdown()
        code = report.pop("exit_code", None)
        if code is None:
            code = {"success": EX_OK, "partial": EX_OK, "interrupted": EX_TEMPFAIL}.get(
                report["status"], EX_FAILED
            )
        return report, code


def failed_report(reason: str) -> dict[str, Any]:
    """The report of a pass that could not start."""
    return {"status": "failed", "reason": reason, "statistics": PassStats().as_dict(), "errors": []}


class Daemon(Service):
    """``run``: passes on an interval, endpoints, reload on SIGHUP, drain on SIGTERM."""

    async def serve(self) -> int:
        """The daemon's whole life; returns the exit code."""
        try:
            await self.startup()
        except ConfigError as exc:
            log.error("configuration unusable", key=exc.key, error=exc.why)
            await self.shutdown()
            return EX_CONFIG
        # Imported here: `once` never serves, and aiohttp.web costs start-up time.
        from aiohttp import web

        from .http import build_app

        runner = web.AppRunner(build_app(self), access_log=None)
        await runner.setup()
        host, port = self.config.http.host_port()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except OSError as exc:
            # A port in use may be free in a moment (an old instance still draining):
            # exit 1, which systemd restarts. Anything else (no such address, a port
            # below 1024) is the configuration's: 78, which it does not.
            busy = exc.errno == errno.EADDRINUSE
            log.error(
                "cannot listen",
                key="http.listen",
                listen=self.config.http.listen,
                error=exc.strerror,
                retry="a restart may succeed" if busy else "fix http.listen",
            )
            await runner.cleanup()
            await self.shutdown()
            return EX_FAILED if busy else EX_CONFIG
        log.info("serving", listen=self.config.http.listen, pid=os.getpid())
        self.notifier.ready("started")
        try:
            async with asyncio.TaskGroup() as tg:
                main = tg.create_task(self.main_loop(), name="main-loop")
                helpers = [
                    tg.create_task(self._reload_loop(), name="reload"),
                    tg.create_task(self._token_loop(), name="token-refresh"),
                    tg.create_task(self._watchdog_loop(main), name="watchdog"),
                ]
                await main
                for t in helpers:
                    t.cancel()
        finally:
            self.notifier.stopping()
            await runner.cleanup()
            await self.shutdown()
        log.info("stopped")
        return EX_OK

    async def main_loop(self) -> None:
        """A pass at once, then every interval; failures back off, never crash-loop."""
        failures = 0
        while not self.stop_event.is_set():
            report = await self.run_pass(allow_incremental=True)
            status = report["status"]
            wait = self.config.sync.interval_seconds
            if status in ("success", "partial"):
                failures = 0
                self.pass_failed = None
            elif status == "failed":
                failures += 1
                self.pass_failed = str(report.get("reason"))
                if report.get("exit_code") != EX_CONFIG:
                    wait = min(wait, 30.0 * 2 ** min(failures - 1, 6))
                log.error("pass failed", reason=self.pass_failed, retry_in=round(wait))
            elif report.get("reason") == "daily_budget" and self.gate is not None:
                resume = self.budget_resume_at = self.gate.budget.resume_at()
                wait = max(resume - time.time(), 1.0)
                log.warning(
                    "daily budget spent; sleeping until it resets", resume_in_seconds=round(wait)
                )
            self.notifier.status(_status_line(report))
            log.info("pass finished", status=status, **report["statistics"])
            self._last_pass_end = time.monotonic()
            self._interval_based = status in ("success", "partial")
            self._next_pass_at = self._last_pass_end + wait
            await self._sleep_until_next()
            self.budget_resume_at = None

    async def _sleep_until_next(self) -> None:
        """Sleep until the next pass is due; a reload may move that time, a stop ends it."""
        while not self.stop_event.is_set():
            remaining = self._next_pass_at - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()

    async def _reload_loop(self) -> None:
        while True:
            await self._hup.wait()
            self._hup.clear()
            await self.reload()

    async def reload(self) -> bool:
        """Re-read the config; apply it if valid, keep the old one otherwise."""
        self.notifier.reloading()
        try:
            if self.config_path is None:
                raise ConfigError("config", "no config file to reload")
            new = load_config(self.config_path, allow_empty=False)
            await self.apply(new)
        except ConfigError as exc:
            self.reload_ok = False
            self.metrics.config_reload_ok.set(0)
            log.error("reload refused; keeping the old config", key=exc.key, error=exc.why)
            return False
        finally:
            self.notifier.ready()
        self.reload_ok = True
        self.metrics.config_reload_ok.set(1)
        log.info(
            "config reloaded",
            workers=new.download.workers,
            requests_per_minute=new.limits.requests_per_minute,
        )
        return True

    async def apply(self, new: Config) -> None:
        """Swap in a validated config: limits, workers, timeouts, log level, interval,
        credentials and accounts server, the url_map file (read again)."""
        old = self.config
        # Checked first: missing credentials or an unreadable url_map refuse the whole
        # reload, with nothing changed yet.
        if old.source.kind == "zoho":
            new.credentials.require()
        url_map = load_url_map(new.source.url_map)
        for section, key in (
            ("storage", "images_dir"),
            ("storage", "state_file"),
            ("http", "listen"),
            ("source", "kind"),
        ):
            if getattr(getattr(old, section), key) != getattr(getattr(new, section), key):
                log.warning(
                    "this key needs a restart; the running value stays", key=f"{section}.{key}"
                )
        new = dataclasses.replace(
            new,
            storage=old.storage,
            http=old.http,
            source=dataclasses.replace(new.source, kind=old.source.kind),
        )
        self.redactor.add(*new.credentials.secrets())
        configure_logging(new.log.level, new.log.format, self.redactor)
        self.config = new
        self.url_map = url_map  # from the next pass on
        if self.client is not None:
            self.client.config = new
        new_credentials = self.tokens is not None and self.tokens.reconfigure(
            new.zoho, new.credentials
        )
        if self.gate is not None:
            await self.gate.reconfigure(
                new.limits.requests_per_minute,
                new.limits.max_concurrent_requests,
                new.limits.daily_request_budget,
                new.limits.daily_budget_reset_hour_utc,
            )
        if self.client is not None:
            self.client.hosts.reconfigure(
                new.limits.per_host_requests_per_second, new.limits.per_host_concurrency
            )
        if self.current_pass is not None:
            self.current_pass.resize(new.download.workers)
            self.current_pass.shutdown_timeout = new.sync.shutdown_timeout_seconds
        self.metrics.workers.set(new.download.workers)
        if self._interval_based:
            self._next_pass_at = self._last_pass_end + new.sync.interval_seconds
            self._wake.set()
        if new_credentials:
            log.info("credentials or accounts server changed; a new token is needed")
            if self.pass_failed is not None:
                # Fixed credentials should not wait out the interval or a back-off.
                self._next_pass_at = time.monotonic()
                self._wake.set()

    async def _token_loop(self) -> None:
        """Keep the token fresh between passes, without hammering a refusing endpoint."""
        assert self.tokens is not None
        tokens = self.tokens
        while True:
            ahead = tokens.expires_at - tokens.refresh_ahead - time.time()
            await asyncio.sleep(min(max(ahead, 1.0), 60.0))
            try:  # a no-op while the token is fresh enough
                await tokens.token()
            except ConfigError as exc:
                log.error(
                    "credentials refused; not asking again before the next interval",
                    key=exc.key,
                    error=exc.why,
                )
                await asyncio.sleep(self.config.sync.interval_seconds)
            except TokenUnavailable as exc:
                log.warning("background token refresh failed", error=str(exc))
                await asyncio.sleep(exc.after)

    async def _watchdog_loop(self, main: asyncio.Task[None]) -> None:
        period = self.notifier.watchdog_seconds
        while True:
            await asyncio.sleep(period / 2 if period else 5.0)
            if period and not main.done():
                self.notifier.watchdog()
            p = self.current_pass
            if p is not None:
                d = p.progress.as_dict()
                self.notifier.status(
                    f"pass: {d['images_done']}/{d['images_queued']} images, "
                    f"{d['items_seen']} items seen, {d['images_per_second']}/s"
                )


def _status_line(report: dict[str, Any]) -> str:
    st = report["statistics"]
    return (
        f"last pass {report['status']}: {st['images_downloaded']} downloaded, "
        f"{st['unchanged']} unchanged, {st['errors']} errors"
    )
