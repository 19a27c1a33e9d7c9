"""Configuration: every bad value is refused with its key; secrets stay hidden."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zoho_image_sync.config import Config, Secret, load
from zoho_image_sync.errors import ConfigError

ENV = {
    "ZOHO_CLIENT_ID": "cid-123456",
    "ZOHO_CLIENT_SECRET": "sec-123456",
    "ZOHO_REFRESH_TOKEN": "ref-123456",
}


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    os.chmod(p, mode)
    return p


def test_defaults_follow_the_contract(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, ""), env=ENV)
    assert cfg.limits.requests_per_minute == 100
    assert cfg.limits.max_concurrent_requests == 10
    assert cfg.limits.daily_request_budget == 5000
    assert cfg.download.workers == 8
    assert cfg.download.max_image_bytes == 7340032
    assert cfg.storage.images_dir == tmp_path / "data/images/item"
    assert cfg.token_file == tmp_path / "data/token.json"
    assert cfg.http.host_port() == ("127.0.0.1", 9464)
    assert cfg.zoho.accounts_base() == "https://accounts.zoho.com"
    assert cfg.zoho.api_base() == "https://www.zohoapis.com/inventory/v1"


def test_data_centres() -> None:
    cfg = Config.from_mapping({"zoho": {"data_center": "ca"}}, Path("/x"), env=ENV)
    assert cfg.zoho.accounts_base() == "https://accounts.zohocloud.ca"
    assert cfg.zoho.api_base("https://www.zohoapis.ca") == "https://www.zohoapis.ca/inventory/v1"
    eu = Config.from_mapping({"zoho": {"data_center": "eu"}}, Path("/x"), env=ENV)
    assert eu.zoho.accounts_base() == "https://accounts.zoho.eu"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[zoho]\nregion = 'eu'\n", "zoho.region"),
        ("[nope]\n", "nope"),
        ("[limits]\nrequests_per_minute = 0\n", "limits.requests_per_minute"),
        ("[limits]\nrequests_per_minute = 100001\n", "limits.requests_per_minute"),
        ("[limits]\nrequests_per_minute = '100'\n", "limits.requests_per_minute"),
        ("[limits]\nmax_concurrent_requests = 101\n", "limits.max_concurrent_requests"),
        ("[download]\nworkers = 0\n", "download.workers"),
        ("[download]\nworkers = true\n", "download.workers"),
        ("[download]\ntimeout_seconds = 0.01\n", "download.timeout_seconds"),
        ("[download]\nmax_image_bytes = 10\n", "download.max_image_bytes"),
        ("[zoho]\ndata_center = 'mars'\n", "zoho.data_center"),
        ("[zoho]\norganization_id = ''\n", "zoho.organization_id"),
        ("[zoho]\nimage_endpoint = 'crm'\n", "zoho.image_endpoint"),
        ("[source]\nimage_endpoint = 'crm'\n", "source.image_endpoint"),
        (
            "[zoho]\nimage_endpoint = 'books'\n[source]\nimage_endpoint = 'inventory'\n",
            "source.image_endpoint",
        ),
        ("[http]\nlisten = 'nowhere'\n", "http.listen"),
        ('[storage]\nimages_dir = "img\\u0000s"\n', "storage.images_dir"),
        ('[zoho]\norganization_id = "1\\u00002"\n', "zoho.organization_id"),
        ("[log]\nlevel = 'loud'\n", "log.level"),
        ("[source]\nkind = 'file'\n", "source.items_file"),
        ("limits = 3\n", "limits"),
        ("[limits\n", "config"),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text), env=ENV)
    assert info.value.key == key


def test_a_config_saved_with_a_bom_reads(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    p.write_bytes(b"\xef\xbb\xbf[download]\nworkers = 3\n")  # Notepad's UTF-8
    assert load(p, env=ENV).download.workers == 3


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "absent.toml", env=ENV)


def test_secret_in_a_group_readable_file_is_refused(tmp_path: Path) -> None:
    p = write(tmp_path, "[zoho]\nclient_secret = 'topsecret-value'\n", mode=0o644)
    with pytest.raises(ConfigError) as info:
        load(p, env={})
    assert info.value.key == "zoho.client_secret"
    assert "topsecret-value" not in str(info.value)


def test_credentials_precedence_env_then_directory_then_file(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "client_id").write_text("dir-client-id\n")
    (creds / "refresh_token").write_text("dir-refresh\n")
    p = write(tmp_path, "[zoho]\nclient_secret = 'file-secret'\nclient_id = 'file-id'\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds), "ZOHO_REFRESH_TOKEN": "env-refresh"}
    cfg = load(p, env=env)
    cid, secret, refresh = cfg.credentials.require()
    assert cid.reveal() == "dir-client-id"
    assert secret.reveal() == "file-secret"
    assert refresh.reveal() == "env-refresh"


def test_a_credential_file_that_is_not_text_names_its_key(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "client_secret").write_bytes(b"\xff\xfesecret-bytes")
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, ""), env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert info.value.key == "zoho.client_secret"
    assert "not UTF-8" in str(info.value) and "secret-bytes" not in str(info.value)


def test_missing_credential_names_the_key(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, ""), env={"ZOHO_CLIENT_ID": "x"})
    with pytest.raises(ConfigError) as info:
        cfg.credentials.require()
    assert info.value.key == "zoho.client_secret"


def test_secrets_never_show_in_repr(tmp_path: Path) -> None:
    p = write(tmp_path, "[zoho]\nclient_secret = 'file-secret-xyz'\n")
    from_env = load(p, env=ENV)  # the environment wins: sec-123456 is the one in use
    no_env_secret = {k: v for k, v in ENV.items() if k != "ZOHO_CLIENT_SECRET"}
    from_file = load(p, env=no_env_secret)  # now the file's secret is the one in use
    used = [c.credentials.client_secret for c in (from_env, from_file)]
    assert [s.reveal() if s else None for s in used] == ["sec-123456", "file-secret-xyz"]
    for cfg in (from_env, from_file):
        for text in (
            repr(cfg),
            str(cfg),
            repr(cfg.credentials),
            str(cfg.credentials),
            repr(cfg.zoho),
            f"{cfg.credentials}",
        ):
            for secret in ("file-secret-xyz", *ENV.values()):
                assert secret not in text
    s = Secret("hunter2-long")
    assert "hunter2" not in repr(s) + str(s) + f"{s}" + f"{s!r}"


@given(st.integers())
def test_workers_range_is_enforced(n: int) -> None:
    data = {"download": {"workers": n}}
    if 1 <= n <= 256:
        assert Config.from_mapping(data, Path("/x"), env=ENV).download.workers == n
    else:
        with pytest.raises(ConfigError, match=r"download\.workers"):
            Config.from_mapping(data, Path("/x"), env=ENV)


def test_image_endpoint_where_the_contract_example_puts_it(tmp_path: Path) -> None:
    # CONTRACT.md's example has image_endpoint after url_map, i.e. in [source].
    text = "[source]\nkind = 'zoho'\nurl_map = ''\n\nimage_endpoint = 'books'\n"
    assert load(write(tmp_path, text), env=ENV).zoho.image_endpoint == "books"
    both = "[zoho]\nimage_endpoint = 'books'\n[source]\nimage_endpoint = 'books'\n"
    assert load(write(tmp_path, both), env=ENV).zoho.image_endpoint == "books"
    assert load(write(tmp_path, "[source]\n"), env=ENV).zoho.image_endpoint == "inventory"
