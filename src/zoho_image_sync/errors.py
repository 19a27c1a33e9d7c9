"""The error tree: every failure the sync can meet, in a handful of documented kinds.

Only the API client (``zoho.py``) and the token manager (``auth.py``) translate
aiohttp's exceptions into these; everything above them speaks this vocabulary.

    SyncError
    ├── ConfigError          the configuration or credentials are unusable (exit 78)
    │   └── CredentialsError Zoho refused the client id, secret or refresh token
    ├── FatalPassError       the pass cannot complete (exit 1)
    │   ├── ScopeError       a fresh token is still refused (missing scope)
    │   └── StorageError     the disk refuses every write (full, read-only)
    ├── BudgetExhausted      the daily request budget is spent (exit 75)
    ├── TransientError       worth retrying with backoff (5xx, reset, timeout, short body)
    │   ├── RetryLater       worth retrying after a known delay (429, token throttle)
    │   └── TokenUnavailable the token endpoint is throttled or unreachable
    └── ItemError            one item failed for a reason from the contract's closed list
"""

from __future__ import annotations

from typing import Final, Literal, get_args

EX_OK: Final = 0
EX_FAILED: Final = 1
EX_TEMPFAIL: Final = 75
EX_CONFIG: Final = 78

Reason = Literal[
    "bad_item_id",
    "bad_url",
    "image_not_found",
    "not_an_image",
    "empty_body",
    "too_large",
    "retries_exhausted",
    "write_failed",
    "forbidden",
]
REASONS: Final[tuple[Reason, ...]] = get_args(Reason)


class SyncError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(SyncError):
    """The configuration is unusable; ``key`` names the culprit."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key = key
        self.why = why


class CredentialsError(ConfigError):
    """Zoho refused the credentials permanently (invalid_code, invalid_client...)."""


class FatalPassError(SyncError):
    """The pass cannot go on: the API is unreachable or refuses us."""


class ScopeError(FatalPassError):
    """A freshly minted token is still refused: the scope or permission is missing."""


class StorageError(FatalPassError):
    """The images folder cannot take files (full, read-only, no permission): pause the pass."""


class BudgetExhausted(SyncError):
    """The daily request budget (ours or Zoho's code 45) is spent."""

    def __init__(self, message: str, resume_at: float | None = None) -> None:
        super().__init__(message)
        self.resume_at = resume_at


class TransientError(SyncError):
    """A failure worth retrying with backoff."""


class RetryLater(TransientError):
    """Retry after ``after`` seconds (a 429, a throttled token endpoint)."""

    def __init__(self, message: str, after: float, code: int | None = None) -> None:
        super().__init__(message)
        self.after = after
        self.code = code


class TokenUnavailable(TransientError):
    """The token endpoint is throttled or unreachable; ``after`` is the back-off."""

    def __init__(self, message: str, after: float) -> None:
        super().__init__(message)
        self.after = after


class ItemError(SyncError):
    """One item failed for one of the contract's reasons."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: Reason = reason
        self.detail = detail


def exit_code(exc: SyncError) -> int:
    """The exit code of a command that stopped on ``exc``: 78 when the config or the
    token's scope must change (no restart will help), else 1 (75 is for budget/signal)."""
    return EX_CONFIG if isinstance(exc, ConfigError | ScopeError) else EX_FAILED
