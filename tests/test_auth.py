"""The token: cached across runs, refreshed once on 401, permanent errors stop at once."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from conftest import CREDS_ENV, SMALL, SimFactory, assert_mirror, run_once, started
from zoho_image_sync.errors import ConfigError
from zoho_image_sync.service import Service


async def test_cached_token_is_reused_and_a_revoked_one_refreshed_once(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    await run_once(cfg)
    assert sim.stats()["tokens_minted"] == 1
    cached = json.loads(cfg.token_file.read_bytes())["access_token"]
    sim.set_image(sim.item_ids_with_images()[0])
    sim.revoke_all_tokens()
    sim.reset_log()
    report, code = await run_once(cfg)
    assert code == 0 and report["status"] == "success"
    assert sim.stats()["tokens_minted"] == 1
    assert json.loads(cfg.token_file.read_bytes())["access_token"] != cached
    # One 401 (code 57), then the same request again with the new token.
    assert sim.stats()["requests"]["items"] == {"401": 1, "200": 2}


async def test_a_token_cached_for_other_credentials_is_not_reused(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    await run_once(make_config(sim))
    # Other credentials (a rotated refresh token, another client): the cached access token
    # was minted for the old ones and is not theirs to use. The simulator knows only the
    # demo refresh token, so the new one is refused at the token endpoint, which proves
    # it was asked instead of the cache being used.
    other = "1000.another0refresh0token"
    cfg = make_config(sim, env={**CREDS_ENV, "ZOHO_REFRESH_TOKEN": other})
    sim.reset_log()
    report, code = await run_once(cfg)
    assert (report["status"], code) == ("failed", 78)
    assert [r.endpoint for r in sim.records] == ["token"]  # no API call with the old token
    assert other not in cfg.token_file.read_text()  # the file keys by a hash, never the secret


async def test_a_hand_edited_token_cache_is_bounded_and_made_private(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    await run_once(cfg)
    doc = json.loads(cfg.token_file.read_bytes())
    # Infinity: a block that would never end and a token that would never expire.
    doc.update(blocked_until=float("inf"), expires_at=float("inf"))
    cfg.token_file.write_text(json.dumps(doc))  # json writes Infinity, and reads it back
    cfg.token_file.chmod(0o644)
    async with started(Service(cfg), readonly=True) as service:
        assert service.tokens is not None
        now = time.time()
        assert now < service.tokens.blocked_until <= now + 30 * 60 + 5
        assert now < service.tokens.expires_at <= now + 24 * 3600 + 5
        assert cfg.token_file.stat().st_mode & 0o777 == 0o600


async def test_token_expiring_mid_pass_costs_one_refresh_and_no_item(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    service = Service(cfg)
    task = asyncio.create_task(service.once())
    await sim.wait_api_requests(60)
    sim.expire_all_tokens()  # as if the hour had run out mid-pass
    report, code = await task
    assert code == 0 and report["status"] == "success"
    assert report["statistics"]["errors"] == 0
    assert sim.stats()["tokens_minted"] == 2
    refused = [r for r in sim.records if r.status == 401]
    assert refused and all(r.zoho_code == 57 for r in refused)
    # Requests in flight when the token died are each retried once: bounded by concurrency.
    assert len(refused) <= cfg.limits.max_concurrent_requests
    assert_mirror(sim, cfg.storage.images_dir)


async def test_injected_401_is_answered_with_one_refresh(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    victim = sim.item_ids_with_images()[60]
    sim.add_fault(
        "status",
        victim,
        times=1,
        status=401,
        body={"code": 57, "message": "You are not authorized to perform this operation"},
    )
    cfg = make_config(sim)
    report, code = await run_once(cfg)
    assert code == 0 and report["statistics"]["errors"] == 0
    assert sim.stats()["tokens_minted"] == 2
    assert sum(r.item_id == victim for r in sim.records) == 2


@pytest.mark.parametrize(
    ("fault", "key"),
    [
        ("invalid_code", "zoho.refresh_token"),
        ("invalid_client", "zoho.client_id"),
        ("invalid_client_secret", "zoho.client_secret"),
    ],
)
async def test_permanent_token_errors_exit_78_naming_the_credential(
    make_sim: SimFactory, make_config: Any, fault: str, key: str
) -> None:
    sim = await make_sim(**SMALL)
    sim.token_fault(fault)
    cfg = make_config(sim)
    report, code = await run_once(cfg)
    assert code == 78
    assert report["status"] == "failed"
    assert key in report["reason"] and fault in report["reason"]
    # No retry loop: exactly one call to the token endpoint, nothing else.
    assert sim.stats()["requests"] == {"token": {"200": 1}}
    # The failure names the key, never the secret: not in the report (stdout, /state),
    # nor in the state file that keeps it as last_pass.
    saved = [p.read_text() for p in cfg.storage.state_file.parent.glob("*.json*")]
    for text in (json.dumps(report), *saved):
        for secret in CREDS_ENV.values():
            assert secret not in text


async def test_throttled_token_endpoint_exits_1_without_hammering(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    sim.token_fault("throttle")
    cfg = make_config(sim)
    report, code = await run_once(cfg)
    assert code == 1 and report["status"] == "failed"
    assert "throttled" in report["reason"]
    assert sim.stats()["requests"]["token"] == {"200": 1}


async def test_missing_credentials_are_a_config_error(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL)
    cfg = make_config(sim, env={"ZOHO_CLIENT_ID": "x"})
    report, code = await run_once(cfg)
    assert code == 78 and "zoho.client_secret" in report["reason"]
    with pytest.raises(ConfigError):
        cfg.credentials.require()


async def test_fresh_token_still_refused_is_a_scope_error(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL, inventory_scope=False)
    cfg = make_config(sim)
    report, code = await run_once(cfg)
    assert code == 78
    assert "ZohoInventory.items.READ" in report["reason"]
    assert sim.stats()["tokens_minted"] == 2  # the first, and the one fresh retry


async def test_legacy_milliseconds_expiry_is_understood(
    make_sim: SimFactory, make_config: Any
) -> None:
    sim = await make_sim(**SMALL, legacy_expires_ms=True)
    cfg = make_config(sim)
    await run_once(cfg)
    expires_at = json.loads(cfg.token_file.read_bytes())["expires_at"]
    assert 3000 < expires_at - time.time() <= 3600


async def test_revoked_token_with_a_throttled_endpoint_is_not_a_scope_error(
    make_sim: SimFactory, make_config: Any
) -> None:
    # Found by the soak: the refused token was handed out again and misread as a scope error.
    sim = await make_sim(**SMALL)
    cfg = make_config(sim)
    await run_once(cfg)
    sim.set_image(sim.item_ids_with_images()[0])
    sim.revoke_all_tokens()
    sim.token_fault("throttle")
    sim.reset_log()
    report, code = await run_once(cfg)
    assert code == 1 and report["status"] == "failed"
    assert "throttled" in report["reason"] and "scope" not in report["reason"]
    assert sim.stats()["requests"] == {"items": {"401": 1}, "token": {"200": 1}}
