"""The daemon for real: systemd notifications, SIGHUP, SIGTERM, metrics against the remote."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path

from conftest import (
    SMALL,
    DaemonFactory,
    SimFactory,
    assert_folder_matches_state,
    daemon_config,
)
from daemon_harness import get_json, scrape
from zoho_image_sync.simulator import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, DEMO_REFRESH_TOKEN


async def test_notify_sequence_reload_and_stop(
    make_sim: SimFactory, daemons: DaemonFactory, tmp_path: Path
) -> None:
    sim = await make_sim(**SMALL)
    cfg, port = daemon_config(tmp_path, sim)
    d = await daemons(cfg, tmp_path, watchdog_usec=200_000)
    await d.wait_for("READY=1")
    status, _body = await get_json(port, "/healthz")
    assert status == 200
    # The pass's STATUS comes once, WATCHDOG=1 every 0.1 s: wait for the one-off first,
    # or reading past it while looking for a watchdog ping would lose it.
    await d.wait_for("STATUS=last pass success")
    await d.wait_for("WATCHDOG=1")
    t0 = time.monotonic()
    d.signal(signal.SIGHUP)
    reloading = await d.wait_for("RELOADING=1")
    assert "MONOTONIC_USEC=" in reloading
    usec = int(reloading.split("MONOTONIC_USEC=")[1].split()[0])
    assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 5
    await d.wait_for("READY=1")
    reload_latency = time.monotonic() - t0
    d.signal(signal.SIGTERM)
    await d.wait_for("STOPPING=1")
    assert await d.wait() == 0
    kinds = [m.split("=")[0] for _, m in d.messages]
    first = {k: kinds.index(k) for k in ("READY", "WATCHDOG", "RELOADING", "STOPPING")}
    assert first["READY"] < first["RELOADING"] < first["STOPPING"]
    assert "READY" in kinds[first["RELOADING"] + 1 :]
    print(f"reload latency {reload_latency * 1000:.1f} ms; sequence {kinds}")


async def test_bad_reload_keeps_the_old_config(
    make_sim: SimFactory, daemons: DaemonFactory, tmp_path: Path
) -> None:
    sim = await make_sim(**SMALL)
    cfg, port = daemon_config(tmp_path, sim)
    d = await daemons(cfg, tmp_path)
    await d.wait_for("STATUS=last pass success")
    good = cfg.read_text()
    for bad in (good.replace("workers = 8", "workers = 0"), "\n"):  # a value; an empty file
        cfg.write_text(bad)
        d.signal(signal.SIGHUP)
        await d.wait_for("RELOADING=1")
        await d.wait_for("READY=1")
        m = await scrape(port)
        assert m[("zoho_image_sync_config_last_reload_successful", ())] == 0
        assert m[("zoho_image_sync_workers", ())] == 8
    status, state = await get_json(port, "/state")
    assert status == 200 and state["workers"] == 8
    assert d.proc is not None and d.proc.returncode is None
    # A good file again: accepted, metric back to 1.
    cfg.write_text(good.replace("workers = 8", "workers = 3"))
    d.signal(signal.SIGHUP)
    await d.wait_for("RELOADING=1")
    await d.wait_for("READY=1")
    m = await scrape(port)
    assert m[("zoho_image_sync_config_last_reload_successful", ())] == 1
    assert m[("zoho_image_sync_workers", ())] == 3
    d.signal(signal.SIGTERM)
    assert await d.wait() == 0
    assert b"download.workers" in d.stderr


async def test_a_listen_port_in_use_exits_1_so_systemd_tries_again(
    make_sim: SimFactory, daemons: DaemonFactory, tmp_path: Path
) -> None:
    sim = await make_sim(**SMALL)
    cfg, port = daemon_config(tmp_path, sim)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        d = await daemons(cfg, tmp_path)
        assert await d.wait() == 1  # not 78: RestartPreventExitStatus=78 would end it
    assert b"cannot listen" in d.stderr and b"a restart may succeed" in d.stderr


async def test_sighup_with_fixed_credentials_recovers_without_a_restart(
    make_sim: SimFactory, daemons: DaemonFactory, tmp_path: Path
) -> None:
    sim = await make_sim(**SMALL)
    creds = {
        "client_id": DEMO_CLIENT_ID,
        "client_secret": DEMO_CLIENT_SECRET,
        "refresh_token": "1000.revoked0or0mistyped",
    }
    # An hour's interval: only the reload can bring the next pass forward.
    cfg, port = daemon_config(tmp_path, sim, zoho=creds, sync={"interval_seconds": 3600})
    cfg.chmod(0o600)  # secrets in the file
    d = await daemons(cfg, tmp_path, credentials_in_env=False)
    await d.wait_for("STATUS=last pass failed")
    status, body = await get_json(port, "/readyz")
    assert status == 503, body
    assert sim.stats()["tokens_minted"] == 0
    cfg.write_text(cfg.read_text().replace("1000.revoked0or0mistyped", DEMO_REFRESH_TOKEN))
    d.signal(signal.SIGHUP)
    await d.wait_for("STATUS=last pass success")
    status, body = await get_json(port, "/readyz")
    assert status == 200, body
    assert sim.stats()["tokens_minted"] == 1
    assert len(list((tmp_path / "data" / "images" / "item").iterdir())) == 120
    d.signal(signal.SIGTERM)
    assert await d.wait() == 0
    assert b"credentials or accounts server changed" in d.stderr
    assert (
        DEMO_REFRESH_TOKEN.encode() not in d.stderr and DEMO_CLIENT_SECRET.encode() not in d.stderr
    )


async def test_sighup_with_a_higher_limit_raises_the_request_rate(
    make_sim: SimFactory, daemons: DaemonFactory, tmp_path: Path
) -> None:
    sim = await make_sim(**SMALL)
    # 30 per rolling minute: 30 requests, then nothing until the first is a minute old.
    cfg, port = daemon_config(
        tmp_path, sim, limits={"requests_per_minute": 30}, download={"workers": 2}
    )
    d = await daemons(cfg, tmp_path)
    await d.wait_for("READY=1")
    await sim.wait_api_requests(30)
    cfg.write_text(
        cfg.read_text()
        .replace("requests_per_minute = 30", "requests_per_minute = 6000")
        .replace("workers = 2", "workers = 16")
    )
    t_hup = time.monotonic()
    d.signal(signal.SIGHUP)
    await d.wait_for("READY=1")
    await sim.wait_api_requests(30 + 90)
    elapsed = time.monotonic() - t_hup
    # At the old limit, 90 more requests need three more minutes (the test's timeout is 60 s).
    assert elapsed < 20, elapsed
    api = [r for r in sim.records if r.is_api]
    first_minute = [r for r in api if r.t - api[0].t < 60]
    assert len(first_minute) >= 120  # 4x the old limit within the first rolling minute
    _status, state = await get_json(port, "/state")
    assert state["workers"] == 16
    m = await scrape(port)
    assert m[("zoho_image_sync_config_last_reload_successful", ())] == 1
    d.signal(signal.SIGTERM)
    assert await d.wait() == 0
    print(f"after reload: 90 requests in {elapsed:.2f} s")


async def test_sigterm_mid_pass_drains_and_exits_0(
    make_sim: SimFactory, daemons: DaemonFactory, tmp_path: Path
) -> None:
    sim = await make_sim(**SMALL)
    sim.add_fault("slow", None, delay=0.3)
    cfg, _port = daemon_config(
        tmp_path, sim, download={"workers": 4}, sync={"shutdown_timeout_seconds": 10}
    )
    d = await daemons(cfg, tmp_path)
    await sim.wait_api_requests(20)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert await d.wait() == 0
    assert time.monotonic() - t0 < 10
    data = tmp_path / "data"
    state = assert_folder_matches_state(data / "images" / "item", data / "state.json")
    done = sum(v["status"] == "downloaded" for v in state["items"].values())
    assert 0 < done < 120
    served = sum(1 for r in sim.records if r.endpoint == "image" and r.status == 200)
    # Every image the simulator finished serving was kept: in-flight ones were drained.
    assert done == served


async def test_drain_deadline_cancels_stuck_downloads_cleanly(
    make_sim: SimFactory, daemons: DaemonFactory, tmp_path: Path
) -> None:
    sim = await make_sim(**SMALL)
    victims = sim.item_ids_with_images()[:2]
    for v in victims:
        sim.add_fault("slow", v, delay=30)
    cfg, _port = daemon_config(
        tmp_path,
        sim,
        download={"workers": 2, "timeout_seconds": 60},
        sync={"shutdown_timeout_seconds": 0.5},
    )
    d = await daemons(cfg, tmp_path)
    await sim.wait_in_flight(2)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert await d.wait() == 0
    assert time.monotonic() - t0 < 5
    assert b"drain deadline passed" in d.stderr
    data = tmp_path / "data"
    assert_folder_matches_state(data / "images" / "item", data / "state.json")


async def test_metrics_agree_with_the_simulator(
    make_sim: SimFactory, daemons: DaemonFactory, tmp_path: Path
) -> None:
    sim = await make_sim(**SMALL)
    ids = sim.item_ids_with_images()
    sim.add_fault("json200", ids[0])
    sim.add_fault("status", ids[1], times=1, status=500)
    sim.add_fault("429", ids[2], times=1, code=1070)
    cfg, port = daemon_config(tmp_path, sim)
    d = await daemons(cfg, tmp_path)
    await d.wait_for("STATUS=last pass partial")
    m = await scrape(port)
    st = sim.stats()

    def metric(name: str, **labels: str) -> float:
        return m.get((name, tuple(sorted(labels.items()))), 0.0)

    for endpoint, codes in st["requests"].items():
        for code, n in codes.items():
            assert metric("zoho_image_sync_api_requests_total", endpoint=endpoint, code=code) == n
    assert metric("zoho_image_sync_images_downloaded_total") == st["images_served"] == 119
    assert metric("zoho_image_sync_bytes_downloaded_total") == st["bytes_served"] - 0
    assert metric("zoho_image_sync_image_failures_total", reason="not_an_image") == 1
    assert metric("zoho_image_sync_rate_limited_total", endpoint="image") == 1
    assert metric("zoho_image_sync_token_refreshes_total", result="success") == st["tokens_minted"]
    assert metric("zoho_image_sync_items", state="downloaded") == 119
    assert metric("zoho_image_sync_items", state="failed") == 1
    assert metric("zoho_image_sync_last_pass_success_timestamp_seconds") > 0
    assert metric("zoho_image_sync_pass_duration_seconds_count") == 1
    status, ready = await get_json(port, "/readyz")
    assert status == 200 and ready["ready"] is True
    status, state = await get_json(port, "/state")
    assert state["items"]["downloaded"] == 119 and state["last_report"]["status"] == "partial"
    assert state["token_expires_at"] > time.time()
    token = json.loads((tmp_path / "data" / "token.json").read_text())["access_token"]
    assert token not in json.dumps(state)
    async with asyncio.timeout(5):
        d.signal(signal.SIGTERM)
        assert await d.wait() == 0
