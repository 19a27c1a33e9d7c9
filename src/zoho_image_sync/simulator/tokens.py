"""Zoho Accounts: minting access tokens, throttling, and checking tokens on API calls.

Tokens are self-verifying (issue time, lifetime and a nonce, signed with a key derived
from the seed and the refresh token), so a token cached by the daemon still works after
the simulator restarts with the same seed. Only revocations live in memory.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import SimConfig

TOKEN_FAULTS = ("invalid_code", "invalid_client", "invalid_client_secret", "throttle", "error500")

ACCESS_DENIED: dict[str, Any] = {
    "error": "Access Denied",
    "error_description": (
        "You have made too many requests continuously. Please try again after some time."
    ),
    "status": "failure",
}

_PAYLOAD = struct.Struct(">QI4s")  # issued at (wall ms), lifetime (s), nonce
_PREFIX = "1000."

TokenState = Literal["ok", "invalid", "dead"]


@dataclass(frozen=True)
class TokenReply:
    """What the token endpoint answers: HTTP status, body, and the fault that caused it."""

    status: int
    body: dict[str, Any] | str
    fault: str | None = None
    minted: bool = False


@dataclass
class _Account:
    """Per refresh token: recent mints, the throttle block, and the live tokens."""

    mints: deque[float] = field(default_factory=deque)
    blocked_until: float = float("-inf")
    live: deque[str] = field(default_factory=deque)


class TokenAuthority:
    """The accounts server of one simulated Zoho organisation."""

    def __init__(
        self, config: SimConfig, clock: Callable[[], float], wall: Callable[[], float]
    ) -> None:
        self.config = config
        self._clock = clock
        self._wall = wall
        self._key = hashlib.sha256(
            f"zoho-sim-token:{config.seed}:{config.refresh_token}".encode()
        ).digest()
        self._accounts: dict[str, _Account] = {}
        self._revoked: set[str] = set()
        self._cut_ms = 0  # tokens issued before this wall time (ms) are dead
        self.fault: str | None = None
        self.minted = 0

    def set_fault(self, kind: str | None) -> None:
        """Make every token request fail in this way until cleared with None."""
        if kind is not None and kind not in TOKEN_FAULTS:
            raise ValueError(f"unknown token fault {kind!r}; expected one of {TOKEN_FAULTS}")
        self.fault = kind

    def exchange(self, params: Mapping[str, str], api_domain: str) -> TokenReply:
        """Answer one POST /oauth/v2/token with these parameters."""
        config = self.config
        if self.fault == "error500":
            return TokenReply(500, "Internal Server Error", fault="error500")
        if self.fault == "throttle":
            return TokenReply(config.throttle_status, dict(ACCESS_DENIED), fault="throttle")
        if self.fault is not None:
            return TokenReply(200, {"error": self.fault}, fault=self.fault)
        if params.get("grant_type") != "refresh_token":
            return TokenReply(200, {"error": "unsupported_grant_type"})
        if params.get("client_id") != config.client_id:
            return TokenReply(200, {"error": "invalid_client"})
        if params.get("client_secret") != config.client_secret:
            return TokenReply(200, {"error": "invalid_client_secret"})
        refresh_token = params.get("refresh_token", "")
        if refresh_token != config.refresh_token:
            return TokenReply(200, {"error": "invalid_code"})
        account = self._accounts.setdefault(refresh_token, _Account())
        now = self._clock()
        while account.mints and account.mints[0] <= now - config.token_throttle_window:
            account.mints.popleft()
        if now < account.blocked_until:
            return TokenReply(config.throttle_status, dict(ACCESS_DENIED))
        if len(account.mints) >= config.token_throttle_count:
            account.blocked_until = now + config.token_block_seconds
            return TokenReply(config.throttle_status, dict(ACCESS_DENIED))
        account.mints.append(now)
        token = self.issue(refresh_token)
        self.minted += 1
        body: dict[str, Any] = {
            "access_token": token,
            "api_domain": api_domain,
            "token_type": "Bearer",
            "expires_in": config.token_ttl,
        }
        if config.legacy_expires_ms:
            body["expires_in"] = config.token_ttl * 1000
            body["expires_in_sec"] = config.token_ttl
        return TokenReply(200, body, minted=True)

    def issue(self, refresh_token: str | None = None) -> str:
        """Mint a valid token directly (no throttle, not counted in tokens_minted)."""
        config = self.config
        issued_ms = int(self._wall() * 1000)
        payload = _PAYLOAD.pack(issued_ms, config.token_ttl, secrets.token_bytes(4))
        token = f"{_PREFIX}{payload.hex()}.{self._sign(payload)}"
        account = self._accounts.setdefault(refresh_token or config.refresh_token, _Account())
        account.live.append(token)
        # Zoho keeps about 15 live tokens per refresh token and silently drops the oldest.
        while len(account.live) > config.max_live_tokens:
            self._revoked.add(account.live.popleft())
        return token

    def _sign(self, payload: bytes) -> str:
        return hmac.new(self._key, payload, hashlib.sha256).hexdigest()[:32]

    def check(self, token: str) -> TokenState:
        """ok, invalid (malformed or not ours: code 14) or dead (expired/revoked: 57)."""
        if not token.startswith(_PREFIX):
            return "invalid"
        payload_hex, _, mac = token[len(_PREFIX) :].partition(".")
        try:
            payload = bytes.fromhex(payload_hex)
        except ValueError:
            return "invalid"
        if len(payload) != _PAYLOAD.size or not hmac.compare_digest(mac, self._sign(payload)):
            return "invalid"
        issued_ms, ttl, _nonce = _PAYLOAD.unpack(payload)
        if token in self._revoked or issued_ms < self._cut_ms:
            return "dead"
        if self._wall() * 1000 >= issued_ms + ttl * 1000:
            return "dead"
        return "ok"

    def revoke_all(self) -> None:
        """Kill every token issued so far, including ones from an earlier run."""
        for account in self._accounts.values():
            self._revoked.update(account.live)
            account.live.clear()
        self._cut_ms = int(self._wall() * 1000)

    def expire_all(self) -> None:
        """Make every current token answer as expired (57)."""
        self.revoke_all()
