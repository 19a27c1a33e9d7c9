"""The request log and the statistics tests assert on."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

API_ENDPOINTS = frozenset({"items", "image", "books_image"})
IMAGE_ENDPOINTS = frozenset({"image", "books_image", "external"})
# Faults after which the client still received the item's true image, complete.
_INTACT_FAULTS = frozenset({None, "slow", "wrong_type"})


@dataclass(frozen=True)
class RequestRecord:
    """One request as the simulator saw it.

    status is 0 when the connection was closed without a response (fault "reset");
    bytes_sent counts body bytes only.
    """

    t: float
    endpoint: str
    path: str
    item_id: str | None
    page: int | None
    status: int
    zoho_code: int | None
    bytes_sent: int
    fault: str | None
    authorized: bool = False  # the request carried an Authorization header

    @property
    def is_api(self) -> bool:
        """Whether Zoho would count this request against the organisation's limits."""
        return self.endpoint in API_ENDPOINTS

    @property
    def served_image(self) -> bool:
        """Whether this response delivered a complete, true image."""
        return (
            self.endpoint in IMAGE_ENDPOINTS
            and self.status == 200
            and self.fault in _INTACT_FAULTS
            and self.bytes_sent > 0
        )

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-able data."""
        return dataclasses.asdict(self)


def max_in_window(records: Iterable[RequestRecord], window: float) -> int:
    """The most API arrivals within any span shorter than window seconds."""
    return max_arrivals_in_window((record.t for record in records if record.is_api), window)


def max_arrivals_in_window(times: Iterable[float], window: float) -> int:
    """The most of ``times`` (in any order) within any span shorter than window seconds."""
    ordered = sorted(times)
    best = 0
    start = 0
    for end, t in enumerate(ordered):
        while t - ordered[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def summarise(
    records: Sequence[RequestRecord],
    *,
    tokens_minted: int,
    max_in_flight: int,
    window: float,
) -> dict[str, Any]:
    """Counts over the log, JSON-able."""
    by_endpoint: dict[str, Counter[str]] = {}
    for record in records:
        by_endpoint.setdefault(record.endpoint, Counter())[str(record.status)] += 1
    served = [record for record in records if record.served_image]
    return {
        "tokens_minted": tokens_minted,
        "requests": {name: dict(counts) for name, counts in sorted(by_endpoint.items())},
        "api_requests": sum(1 for record in records if record.is_api),
        "images_served": len(served),
        "bytes_served": sum(record.bytes_sent for record in served),
        "bytes_sent": sum(record.bytes_sent for record in records),
        "faults_injected": dict(Counter(record.fault for record in records if record.fault)),
        "max_in_flight": max_in_flight,
        "max_in_window": max_in_window(records, window),
    }
