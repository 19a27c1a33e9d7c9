"""GET /items: the query parameters Zoho takes and the page body it answers with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .catalogue import FILTERS, SORT_COLUMNS, Catalogue, parse_time


class BadParam(Exception):
    """A query parameter Zoho refuses with code 2; the message names it."""


def _positive_int(query: Mapping[str, str], name: str, default: str) -> int:
    try:
        value = int(query.get(name, default))
    except ValueError:
        raise BadParam(name) from None
    if value < 1:
        raise BadParam(name)
    return value


def items_page(catalogue: Catalogue, query: Mapping[str, str], per_page_max: int) -> dict[str, Any]:
    """The body of one items page, or BadParam for a parameter Zoho would refuse."""
    page = _positive_int(query, "page", "1")
    per_page = min(_positive_int(query, "per_page", "200"), per_page_max)
    sort_column = query.get("sort_column", "name")
    if sort_column not in SORT_COLUMNS:
        raise BadParam("sort_column")
    sort_order = query.get("sort_order", "A")
    if sort_order not in ("A", "D"):
        raise BadParam("sort_order")
    filter_by = query.get("filter_by", "Status.All")
    if filter_by not in FILTERS:
        raise BadParam("filter_by")
    modified_after = None
    if "last_modified_time" in query:
        try:
            modified_after = parse_time(query["last_modified_time"])
        except ValueError:
            raise BadParam("last_modified_time") from None
    items, more = catalogue.page(page, per_page, sort_column, sort_order, filter_by, modified_after)
    return {
        "code": 0,
        "message": "success",
        "items": items,
        "page_context": {
            "page": page,
            "per_page": per_page,
            "has_more_page": more,
            "report_name": "Items",
            "applied_filter": filter_by,
            "sort_column": sort_column,
            "sort_order": sort_order,
        },
    }
