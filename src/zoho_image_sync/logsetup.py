"""structlog on stderr: JSON lines for journald, readable console on a TTY, no secrets ever.

The ``Redactor`` is the last line of defence: every string in every event is scrubbed
of the known secret values (credentials and the current access token) and of anything
that looks like an ``Authorization: Zoho-oauthtoken`` header or a Zoho token.
"""

from __future__ import annotations

import logging
import re
import sys
from collections import deque
from collections.abc import MutableMapping
from typing import Any, Final, TextIO

import structlog

LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_TOKEN_SHAPES: Final = re.compile(
    r"(Zoho-oauthtoken\s+)\S+|\b1000\.[0-9a-fA-F]{16,}\.[0-9a-fA-F]{16,}\b", re.IGNORECASE
)


class Redactor:
    """A structlog processor that replaces secret values with ``***``."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        # Access tokens rotate hourly: the current one and the one before it (a request
        # may still carry it) are matched exactly, older ones by _TOKEN_SHAPES, so the
        # list does not grow by one token per hour for the daemon's life.
        self._tokens: deque[str] = deque(maxlen=2)

    def add(self, *values: str) -> None:
        """Register values that must never be printed (short ones are ignored)."""
        self._secrets.update(v for v in values if v and len(v) >= 6)

    def add_token(self, token: str) -> None:
        """Register a freshly minted access token (it replaces the oldest one held)."""
        if token and len(token) >= 6 and token not in self._tokens:
            self._tokens.append(token)

    def scrub(self, text: str) -> str:
        """``text`` with every secret replaced."""
        for secret in (*self._secrets, *self._tokens):
            if secret in text:
                text = text.replace(secret, "***")
        return _TOKEN_SHAPES.sub(lambda m: (m.group(1) or "") + "***", text)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._clean(v) for v in value)
        return value

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in list(event_dict.items()):
            event_dict[key] = self._clean(value)
        return event_dict


_debug = False


def debug_enabled() -> bool:
    """True when debug lines are printed: a hot path checks before building one."""
    return _debug


def configure(
    level: str = "info",
    fmt: str = "auto",
    redactor: Redactor | None = None,
    stream: TextIO | None = None,
) -> None:
    """(Re)configure logging; called at start and on SIGHUP."""
    global _debug
    _debug = LEVELS[level] <= logging.DEBUG
    stream = stream or sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if redactor is not None:
        processors.append(redactor)
    if use_console:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    else:
        processors.append(structlog.processors.JSONRenderer())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
