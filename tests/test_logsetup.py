"""The log redactor, through structlog as the program configures it: no secret is printed."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from zoho_image_sync.logsetup import Redactor, configure

SECRET = "client0secret0value"
OLD, NEW = ("1000." + c * 32 + "." + c * 32 for c in "ab")
OPAQUE_OLD, OPAQUE_MID, OPAQUE_NEW = "opaque-token-one", "opaque-token-two", "opaque-token-three"


@pytest.fixture
def logged() -> Iterator[tuple[Redactor, io.StringIO]]:
    saved = structlog.get_config()
    redactor, out = Redactor(), io.StringIO()
    configure("debug", "json", redactor, stream=out)
    try:
        yield redactor, out
    finally:
        structlog.configure(**saved)


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_registered_secrets_are_replaced_wherever_they_appear(
    logged: tuple[Redactor, io.StringIO],
) -> None:
    redactor, out = logged
    redactor.add(SECRET, "short")  # under 6 characters: ignored, never blanked everywhere
    log = structlog.get_logger("t")
    log.info(f"event with {SECRET}", detail={"nested": [f"x{SECRET}y", ("t", SECRET)]})
    try:
        raise RuntimeError(f"refused {SECRET}")
    except RuntimeError:
        log.exception("failed")
    text = out.getvalue()
    assert SECRET not in text
    first, second = lines(out)
    assert first["event"] == "event with ***"
    assert first["detail"] == {"nested": ["x***y", ["t", "***"]]}
    assert "refused ***" in str(second["exception"])
    log.info("a short word stays", word="short")
    assert lines(out)[-1]["word"] == "short"


def test_tokens_rotate_and_token_shapes_are_caught(logged: tuple[Redactor, io.StringIO]) -> None:
    redactor, out = logged
    log = structlog.get_logger("t")
    for token in (OPAQUE_OLD, OPAQUE_MID, OPAQUE_NEW):
        redactor.add_token(token)
    log.info("tokens", held=[OPAQUE_MID, OPAQUE_NEW], dropped=OPAQUE_OLD)
    entry = lines(out)[-1]
    assert entry["held"] == ["***", "***"]
    # Only the last two are held exactly (the list does not grow for the daemon's life).
    assert entry["dropped"] == OPAQUE_OLD
    # Zoho-shaped tokens are caught whether registered or not, and any header value.
    log.info("shapes", a=OLD, b=f"Authorization: Zoho-oauthtoken {OPAQUE_OLD}", c=f"[{NEW}]")
    entry = lines(out)[-1]
    assert entry == {**entry, "a": "***", "b": "Authorization: Zoho-oauthtoken ***", "c": "[***]"}
