"""The access token: minted rarely, cached across restarts, refreshed ahead of expiry.

Zoho mints about 10 tokens per refresh token per 10 minutes and then blocks for 15-30
minutes, so this module owns the secret and guards the endpoint: one refresh in flight
(under a lock), a 0600 cache file reused while valid, a throttle answered with a back-off
of minutes, and permanent credential errors surfaced at once, never retried in a loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import aiohttp
import structlog

from .config import Credentials, Secret, ZohoConfig
from .errors import CredentialsError, TokenUnavailable
from .limits import backoff_delay
from .metrics import Metrics
from .storage import write_bytes_atomic

log = structlog.get_logger(__name__)

REFRESH_AHEAD_SECONDS: Final = 300.0
THROTTLE_BACKOFF: Final = (15 * 60.0, 30 * 60.0)
# Bounds on the times read back from the token cache (Zoho's tokens last an hour).
MAX_CACHED_BLOCK: Final = THROTTLE_BACKOFF[1]
MAX_CACHED_LIFETIME: Final = 24 * 3600.0
PERMANENT_ERRORS: Final = {
    "invalid_client": "zoho.client_id",
    "invalid_client_secret": "zoho.client_secret",
    "invalid_code": "zoho.refresh_token",
}
PERMANENT_HINTS: Final = {
    "invalid_client": "the client id is unknown to this data centre (check zoho.data_center)",
    "invalid_client_secret": "the client secret does not match the client id",
    "invalid_code": "the refresh token is revoked, replaced or belongs to another client",
}


class TokenManager:
    """Holds the access token; ``token()`` always returns one that is valid now."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        zoho: ZohoConfig,
        credentials: Credentials,
        cache_path: Path,
        metrics: Metrics,
        timeout: float = 30.0,
        max_attempts: int = 3,
        wall: Callable[[], float] = time.time,
        on_token: Callable[[str], None] | None = None,
    ) -> None:
        self._session = session
        self._zoho = zoho
        self._credentials = credentials
        self._cache_path = cache_path
        self._metrics = metrics
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._wall = wall
        self._on_token = on_token or (lambda _t: None)
        self._token: Secret | None = None
        self.expires_at = 0.0
        self.lifetime = 3600.0
        self.api_domain: str | None = None
        self.blocked_until = 0.0
        self.last_error: str | None = None
        self._lock = asyncio.Lock()
        self._load_cache()

    def __repr__(self) -> str:
        return f"TokenManager(held={self._token is not None}, expires_at={self.expires_at:.0f})"

    def reconfigure(self, zoho: ZohoConfig, credentials: Credentials) -> bool:
        """A reload: other credentials or another accounts server drop the token held (it
        was minted for the old ones) and their errors. True if anything changed."""
        changed = (
            credentials != self._credentials or zoho.accounts_base() != self._zoho.accounts_base()
        )
        self._zoho = zoho
        if changed:
            self._credentials = credentials
            self._token = None
            self.expires_at = 0.0
            self.api_domain = None
            self.blocked_until = 0.0  # Zoho throttles per refresh token
            self.last_error = None
            self._load_cache()  # one cached for these very credentials, if any
        return changed

    @property
    def held(self) -> bool:
        """A token is held and not expired."""
        return self._token is not None and self._wall() < self.expires_at

    def _cache_key(self) -> str | None:
        if self._credentials.client_id is None or self._credentials.refresh_token is None:
            return None
        client_id, refresh = self._credentials.client_id, self._credentials.refresh_token
        material = f"{client_id.reveal()}\0{refresh.reveal()}"
        return hashlib.sha256(material.encode()).hexdigest()[:24]

    def _load_cache(self) -> None:
        try:
            self._private_cache()
            doc = json.loads(self._cache_path.read_bytes())
            if self._cache_key() is None or doc.get("key") != self._cache_key():
                return
            now = self._wall()
            # Zoho's throttle outlives a restart: so does our back-off. Both times are
            # bounded (a hand-edited Infinity would block, or trust a token, for ever).
            blocked = float(doc.get("blocked_until") or 0.0)
            self.blocked_until = min(blocked, now + MAX_CACHED_BLOCK) if blocked > 0 else 0.0
            token, expires_at = doc["access_token"], float(doc["expires_at"] or 0.0)
            expires_at = min(expires_at, now + MAX_CACHED_LIFETIME) if expires_at > 0 else 0.0
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return
        if isinstance(token, str) and token and expires_at > self._wall():
            self._token = Secret(token)
            self._on_token(token)
            self.expires_at = expires_at
            self.api_domain = doc.get("api_domain") or None
            self.lifetime = float(doc.get("lifetime") or 3600.0)
            self._metrics.token_expiry.set(expires_at)

    def _private_cache(self) -> None:
        """The cache holds a secret: readable by its owner only, put right if it is not."""
        try:
            mode = self._cache_path.stat().st_mode & 0o777
        except FileNotFoundError:
            return
        if mode & 0o077:
            os.chmod(self._cache_path, 0o600)
            log.warning(
                "token cache was readable by others; made private",
                path=str(self._cache_path),
                mode=f"{mode:04o}",
            )

    def _save_cache(self) -> None:
        doc = {
            "access_token": self._token.reveal() if self._token is not None else None,
            "expires_at": self.expires_at,
            "blocked_until": self.blocked_until,
            "api_domain": self.api_domain,
            "lifetime": self.lifetime,
            "key": self._cache_key(),
        }
        write_bytes_atomic(self._cache_path, json.dumps(doc).encode(), mode=0o600)

    @property
    def refresh_ahead(self) -> float:
        """How long before expiry to refresh: 5 minutes, or a tenth of a short lifetime."""
        return min(REFRESH_AHEAD_SECONDS, 0.1 * self.lifetime)

    def _fresh_enough(self) -> bool:
        return self._token is not None and self._wall() < self.expires_at - self.refresh_ahead

    async def token(self) -> str:
        """A valid access token, refreshed first when missing or close to expiry."""
        if self._fresh_enough():
            assert self._token is not None
            return self._token.reveal()
        return await self.refresh(stale=self._token.reveal() if self._token else None)

    async def refresh(self, stale: str | None) -> str:
        """Mint a new token unless another caller already replaced ``stale``."""
        async with self._lock:
            if self._token is not None and self._token.reveal() != stale and self.held:
                return self._token.reveal()
            if stale is None and self._fresh_enough():
                assert self._token is not None
                return self._token.reveal()
            await self._mint()
            assert self._token is not None
            return self._token.reveal()

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (the server refused it)."""
        if self._token is not None and self._token.reveal() == token:
            self.expires_at = 0.0

    async def _mint(self) -> None:
        now = self._wall()
        if now < self.blocked_until:
            raise TokenUnavailable(
                "token endpoint throttled by Zoho; not asking again before "
                f"{time.strftime('%H:%M:%S', time.localtime(self.blocked_until))}",
                after=self.blocked_until - now,
            )
        client_id, client_secret, refresh_token = self._credentials.require()
        url = f"{self._zoho.accounts_base()}/oauth/v2/token"
        form = {
            "refresh_token": refresh_token.reveal(),
            "client_id": client_id.reveal(),
            "client_secret": client_secret.reveal(),
            "grant_type": "refresh_token",
        }
        for attempt in range(1, self._max_attempts + 1):
            try:
                body, status = await self._post(url, form)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                # The exception text never holds the form body; still, keep only its type.
                self.last_error = f"token endpoint unreachable ({type(exc).__name__})"
                self._metrics.token_refreshes.labels("unreachable").inc()
                log.warning("token refresh failed", error=self.last_error, attempt=attempt)
                if attempt == self._max_attempts:
                    raise TokenUnavailable(self.last_error, after=60.0) from None
                await asyncio.sleep(backoff_delay(attempt, base=1.0))
                continue
            self._handle_response(body, status)
            return

    async def _post(self, url: str, form: dict[str, str]) -> tuple[Any, int]:
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with self._session.post(url, data=form, timeout=timeout) as resp:
            self._metrics.api_requests.labels("token", str(resp.status)).inc()
            if resp.status >= 500:
                raise aiohttp.ClientResponseError(
                    resp.request_info, (), status=resp.status, message="server error"
                )
            try:
                return await resp.json(content_type=None), resp.status
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"token endpoint answered HTTP {resp.status}, not JSON") from None

    def _handle_response(self, body: Any, status: int) -> None:
        if not isinstance(body, dict):
            body = {}
        error = body.get("error")
        token = body.get("access_token")
        if isinstance(token, str) and token and not error:
            self._accept(body, token)
            return
        if error in PERMANENT_ERRORS:
            self._metrics.token_refreshes.labels("error").inc()
            key = PERMANENT_ERRORS[error]
            self.last_error = f"Zoho refused the credentials: {error}"
            raise CredentialsError(key, f"Zoho answered '{error}': {PERMANENT_HINTS[error]}")
        if error == "Access Denied" or "too many requests" in str(
            body.get("error_description", "")
        ):
            self._metrics.token_refreshes.labels("throttled").inc()
            backoff = random.uniform(*THROTTLE_BACKOFF)
            self.blocked_until = self._wall() + backoff
            self.last_error = "token endpoint throttled (Access Denied: too many requests)"
            try:
                self._save_cache()
            except OSError as exc:
                log.warning("could not write the token cache", error=exc.strerror)
            log.error(
                "token endpoint throttled by Zoho; backing off",
                backoff_seconds=round(backoff),
            )
            raise TokenUnavailable(self.last_error, after=backoff)
        self._metrics.token_refreshes.labels("error").inc()
        self.last_error = f"unexpected token response (HTTP {status}, error={error!r})"
        raise TokenUnavailable(self.last_error, after=60.0)

    def _accept(self, body: dict[str, Any], token: str) -> None:
        expires_in = body.get("expires_in_sec", body.get("expires_in", 3600))
        try:
            seconds = float(expires_in)
        except (TypeError, ValueError):
            seconds = 3600.0
        if "expires_in_sec" not in body and seconds > 86400:
            seconds /= 1000.0  # old responses gave milliseconds
        self._token = Secret(token)
        self._on_token(token)
        self.expires_at = self._wall() + seconds
        self.lifetime = seconds
        domain = body.get("api_domain")
        self.api_domain = domain if isinstance(domain, str) and domain else None
        self.last_error = None
        self._metrics.token_refreshes.labels("success").inc()
        self._metrics.token_expiry.set(self.expires_at)
        try:
            self._save_cache()
        except OSError as exc:
            log.warning("could not write the token cache", error=exc.strerror)
        log.info("access token refreshed", expires_in=round(seconds))
