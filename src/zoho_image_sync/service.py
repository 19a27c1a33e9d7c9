"""The lifecycle: one class, named phases (startup, passes, shutdown), signals as intents.

Signal handlers only record what was asked (``handle_term``, ``handle_hup``); the
loops act on it. Tests call those methods directly instead of sending signals.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from .auth import TokenManager
from .config import Config
from .errors import (
    EX_CONFIG,
    EX_FAILED,
    EX_OK,
    EX_TEMPFAIL,
    ConfigError,
    ScopeError,
    SyncError,
)
from .limits import ApiGate, DailyBudget, HostGate
from .logsetup import Redactor
from .metrics import Metrics
from .pager import load_url_map, zoho_pages
from .state import State
from .storage import sweep_temporaries
from .sync import STAT_KEYS, SyncPass
from .zoho import ZohoClient

log = structlog.get_logger(__name__)


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
    ) -> None:
        self.config = config
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

    # -- intents -----------------------------------------------------------

    def handle_term(self) -> None:
        """Record a stop request; the loops wind down."""
        if not self.stop_event.is_set():
            log.info("stop requested: finishing in-flight downloads")
        self.stop_event.set()

    # -- phases ------------------------------------------------------------

    async def startup(self, lock: bool = True) -> None:
        """Lock, sweep crash leftovers, load state, build the client."""
        cfg = self.config
        cfg.credentials.require()
        if lock:
            self._lock.acquire()
        cfg.storage.images_dir.mkdir(parents=True, exist_ok=True)
        swept = sweep_temporaries(cfg.storage.images_dir)
        swept += sweep_temporaries(cfg.storage.state_file.parent)
        if swept:
            log.info("removed temporaries left by an earlier crash", count=swept)
        self.state = State.open(cfg.storage.state_file)
        self.last_report = self.state.last_pass
        self.url_map = load_url_map(cfg.source.url_map)
        budget_meta = self.state.meta.get("budget") or {}
        budget = DailyBudget(
            cfg.limits.daily_request_budget,
            spent=int(budget_meta.get("spent", 0)),
            day=str(budget_meta.get("day", "")),
        )
        self.gate = ApiGate(
            cfg.limits.requests_per_minute, cfg.limits.max_concurrent_requests, budget
        )
        hosts = HostGate(cfg.limits.per_host_requests_per_second, cfg.limits.per_host_concurrency)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, headers={"User-Agent": "zoho-image-sync"}
        )
        self.tokens = TokenManager(
            self._session,
            cfg.zoho,
            cfg.credentials,
            cfg.token_file,
            self.metrics,
            timeout=cfg.download.timeout_seconds,
            wall=time.time,
            on_token=self.redactor.add,
        )
        self.client = ZohoClient(self._session, cfg, self.tokens, self.gate, hosts, self.metrics)
        self.metrics.set_item_counts(self.state.counts())
        self.metrics.daily_budget_remaining.set(budget.remaining)
        self.metrics.workers.set(cfg.download.workers)

    async def run_pass(self) -> dict[str, Any]:
        """One full pass; returns its report."""
        assert self.client is not None and self.state is not None and self.gate is not None
        client = self.client
        p = SyncPass(
            pages=lambda: zoho_pages(client),
            client=client,
            state=self.state,
            metrics=self.metrics,
            images_dir=self.config.storage.images_dir,
            url_map=self.url_map,
            workers=self.config.download.workers,
            shutdown_timeout=self.config.sync.shutdown_timeout_seconds,
            stop=self.stop_event,
        )
        self.current_pass = p
        try:
            report = await p.run()
        finally:
            self.current_pass = None
            self._save_budget()
        self.last_report = report
        self.metrics.daily_budget_remaining.set(self.gate.budget.remaining)
        if p.fatal is not None:
            report["exit_code"] = EX_CONFIG if _is_config(p.fatal) else EX_FAILED
        return report

    def _save_budget(self) -> None:
        if self.state is not None and self.gate is not None:
            b = self.gate.budget
            self.state.meta["budget"] = {"day": b.day, "spent": b.spent}

    async def shutdown(self) -> None:
        """Flush state, close the session, release the lock."""
        try:
            if self.state is not None:
                self._save_budget()
                await self.state.save()
        finally:
            if self._session is not None:
                await self._session.close()
                self._session = None
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
        finally:
            await self.shutdown()
        code = report.pop("exit_code", None)
        if code is None:
            code = {"success": EX_OK, "partial": EX_OK, "interrupted": EX_TEMPFAIL}.get(
                report["status"], EX_FAILED
            )
        return report, code


def _is_config(exc: SyncError) -> bool:
    return isinstance(exc, ConfigError | ScopeError)


def failed_report(reason: str) -> dict[str, Any]:
    """The report of a pass that could not start."""
    stats = {k: 0 for k in STAT_KEYS}
    return {"status": "failed", "reason": reason, "statistics": stats, "errors": []}
