"""Injected failures: which request gets which fault, and how many times."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FAULT_KINDS = (
    "status",
    "reset",
    "truncate",
    "slow",
    "json200",
    "html200",
    "empty",
    "oversize",
    "not_found",
    "429",
    "wrong_type",
)

# Public endpoint names (as add_fault takes them) -> the endpoint names of the request log.
ENDPOINTS = {
    "image": "image",
    "items": "items",
    "books": "books_image",
    "books_image": "books_image",
    "external": "external",
}

_IMAGE_ONLY = frozenset({"oversize", "wrong_type"})
_PARAMS: dict[str, frozenset[str]] = {
    "status": frozenset({"status", "body"}),
    "slow": frozenset({"delay"}),
    "oversize": frozenset({"size"}),
    "429": frozenset({"code"}),
}
_RANDOM_PARAMS = frozenset({"rate", "kinds", "seed"}).union(*_PARAMS.values())


@dataclass(frozen=True)
class Injection:
    """One fault chosen for one request."""

    kind: str
    params: Mapping[str, Any]


@dataclass
class Fault:
    """A registered fault: what, where, how often."""

    kind: str
    endpoint: str
    item_id: str | None
    times: int | None
    params: dict[str, Any]
    rng: random.Random | None = field(default=None, repr=False)


def _check_kind(kind: str, endpoint: str) -> None:
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
    if kind in _IMAGE_ONLY and endpoint == "items":
        raise ValueError(f"fault {kind!r} needs an image endpoint, not items")


def make_fault(
    kind: str, item_id: str | None, endpoint: str, times: int | None, params: dict[str, Any]
) -> Fault:
    """Validate and build a fault (ValueError names what is wrong)."""
    if endpoint not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {sorted(ENDPOINTS)}")
    endpoint = ENDPOINTS[endpoint]
    if times is not None and times < 1:
        raise ValueError("times must be >= 1 or None")
    allowed = _RANDOM_PARAMS if kind == "random" else _PARAMS.get(kind, frozenset())
    allowed = allowed | {"page"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"fault {kind!r} takes no parameter {', '.join(unknown)}")
    if "page" in params and endpoint != "items":
        raise ValueError("page only applies to the items endpoint")
    if item_id is not None and endpoint == "items":
        raise ValueError("the items endpoint has no item_id; use page=N")
    rng = None
    if kind == "random":
        kinds = params.get("kinds") or [k for k in FAULT_KINDS if k not in _IMAGE_ONLY]
        if isinstance(kinds, str) or not kinds:
            raise ValueError("kinds must be a non-empty list of fault kinds")
        for each in kinds:
            _check_kind(each, endpoint)
        rate = float(params.get("rate", 0.1))
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be between 0 and 1")
        params = {**params, "kinds": list(kinds), "rate": rate}
        rng = random.Random(params.get("seed", 0))
    else:
        _check_kind(kind, endpoint)
    if kind == "429" and params.get("code", 44) not in (44, 45, 1070):
        raise ValueError("429 code must be 44, 45 or 1070")
    return Fault(kind, endpoint, item_id, times, dict(params), rng)


class FaultBook:
    """Registered faults, consulted once per request in the order they were added."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        """Register a fault built by make_fault."""
        self._faults.append(fault)

    def clear(self) -> None:
        """Drop every fault."""
        self._faults.clear()

    def __len__(self) -> int:
        return len(self._faults)

    def pick(self, endpoint: str, item_id: str | None, page: int | None) -> Injection | None:
        """The fault this request gets, if any (uses up one of its times)."""
        for fault in self._faults:
            if fault.endpoint != endpoint:
                continue
            if fault.item_id is not None and fault.item_id != item_id:
                continue
            wanted_page = fault.params.get("page")
            if wanted_page is not None and int(wanted_page) != page:
                continue
            injection = self._fire(fault)
            if injection is None:
                continue
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
            return injection
        return None

    @staticmethod
    def _fire(fault: Fault) -> Injection | None:
        params = {k: v for k, v in fault.params.items() if k not in ("page", "kinds", "rate")}
        if fault.rng is None:
            return Injection(fault.kind, params)
        if fault.rng.random() >= fault.params["rate"]:
            return None
        params.pop("seed", None)
        return Injection(fault.rng.choice(fault.params["kinds"]), params)
