"""The simulator's settings: one frozen value object, defaults matching the real account."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

# Obviously fake credentials the simulator accepts by default (the `demo` command uses them).
DEMO_CLIENT_ID = "1000.DEMOCLIENTID0SIMULATOR0NOT0REAL"
DEMO_CLIENT_SECRET = "demo0client0secret0simulator0not0real0000"  # noqa: S105 (fake by design)
DEMO_REFRESH_TOKEN = "1000.demo0refresh0token0simulator.not0a0real0token0000"  # noqa: S105
# The same, as the environment variables zoho-image-sync reads its credentials from.
DEMO_CREDS_ENV: Mapping[str, str] = MappingProxyType(
    {
        "ZOHO_CLIENT_ID": DEMO_CLIENT_ID,
        "ZOHO_CLIENT_SECRET": DEMO_CLIENT_SECRET,
        "ZOHO_REFRESH_TOKEN": DEMO_REFRESH_TOKEN,
    }
)

_REAL_ITEMS = 2205
_REAL_WITH_IMAGES = 1605
_REAL_PNG = 22

# Settings that may change while the simulator runs (`Simulator.update_config`,
# `POST /__sim/config`); the rest shape the catalogue or the tokens and stay fixed.
RUNTIME_KEYS = frozenset(
    {
        "per_minute",
        "window_seconds",
        "max_concurrent",
        "daily_limit",
        "day_seconds",
        "retry_after",
        "not_found_style",
        "inventory_scope",
        "image_scope",
        "throttle_status",
        "token_ttl",
        "legacy_expires_ms",
        "token_throttle_count",
        "token_throttle_window",
        "token_block_seconds",
        "max_live_tokens",
        "per_page_max",
        "latency",
    }
)


@dataclass(frozen=True)
class SimConfig:
    """How the simulated Zoho account looks and behaves; validated when built."""

    seed: int = 1
    items: int = _REAL_ITEMS
    with_images: int | None = None
    png_share: float = _REAL_PNG / _REAL_WITH_IMAGES
    min_image_bytes: int = 30_000
    max_image_bytes: int = 300_000
    per_minute: int | None = 100
    window_seconds: float = 60.0
    max_concurrent: int | None = 10
    daily_limit: int | None = None
    day_seconds: float = 86_400.0
    token_ttl: int = 3600
    token_throttle_count: int = 10
    token_throttle_window: float = 600.0
    token_block_seconds: float = 900.0
    throttle_status: int = 200
    legacy_expires_ms: bool = False
    max_live_tokens: int = 15
    retry_after: int | None = None
    organization_id: str = "748369814"
    client_id: str = DEMO_CLIENT_ID
    client_secret: str = DEMO_CLIENT_SECRET
    refresh_token: str = DEMO_REFRESH_TOKEN
    inventory_scope: bool = True
    # False: the token may list items but not read Inventory images (the ERP's case that
    # the Books endpoint works around).
    image_scope: bool = True
    not_found_style: str = "404"
    per_page_max: int = 200
    # Server-side time per admitted API request (s), so requests overlap in flight as they
    # do over a real network; 0 answers at once.
    latency: float = 0.0

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.items < 0:
            problems.append("items must be >= 0")
        if self.with_images is not None and not 0 <= self.with_images <= self.items:
            problems.append("with_images must be between 0 and items")
        if not 0.0 <= self.png_share <= 1.0:
            problems.append("png_share must be between 0 and 1")
        if not 1 <= self.min_image_bytes <= self.max_image_bytes:
            problems.append("need 1 <= min_image_bytes <= max_image_bytes")
        for name in ("per_minute", "max_concurrent", "daily_limit"):
            value = getattr(self, name)
            if value is not None and value < 0:
                problems.append(f"{name} must be >= 0 or None")
        for name in ("window_seconds", "day_seconds", "token_throttle_window"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        if self.token_block_seconds < 0:
            problems.append("token_block_seconds must be >= 0")
        if self.throttle_status not in (200, 400):
            problems.append("throttle_status must be 200 or 400")
        if self.not_found_style not in ("404", "400"):
            problems.append('not_found_style must be "404" or "400"')
        if self.max_live_tokens < 1:
            problems.append("max_live_tokens must be >= 1")
        if self.per_page_max < 1:
            problems.append("per_page_max must be >= 1")
        if self.latency < 0:
            problems.append("latency must be >= 0")
        if self.retry_after is not None and self.retry_after < 0:
            problems.append("retry_after must be >= 0 or None")
        if problems:
            raise ValueError("invalid SimConfig: " + "; ".join(problems))

    @property
    def image_count(self) -> int:
        """How many catalogue items start with an image."""
        if self.with_images is not None:
            return self.with_images
        if self.items == _REAL_ITEMS:
            return _REAL_WITH_IMAGES
        return round(self.items * _REAL_WITH_IMAGES / _REAL_ITEMS)

    @property
    def png_count(self) -> int:
        """How many of the starting images are PNG (the rest are JPEG)."""
        return round(self.image_count * self.png_share)

    def with_runtime(self, changes: dict[str, Any]) -> SimConfig:
        """A copy with run-time settings changed; unknown or fixed keys are refused."""
        fixed = sorted(set(changes) - RUNTIME_KEYS)
        if fixed:
            raise ValueError(f"cannot change at run time: {', '.join(fixed)}")
        return dataclasses.replace(self, **changes)
