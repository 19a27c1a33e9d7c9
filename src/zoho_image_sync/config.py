"""The configuration: a frozen, typed value object, validated once when it is built.

Every unknown key, wrong type or out-of-range value raises ``ConfigError`` naming
the key. Reload builds a new ``Config`` and the service swaps it in only if it built.
"""

from __future__ import annotations

import math
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from .errors import ConfigError
from .logsetup import LEVELS

DATA_CENTERS: Final[dict[str, tuple[str, str]]] = {
    # data_center: (accounts host, API host), per Zoho's published list.
    "com": ("https://accounts.zoho.com", "https://www.zohoapis.com"),
    "eu": ("https://accounts.zoho.eu", "https://www.zohoapis.eu"),
    "in": ("https://accounts.zoho.in", "https://www.zohoapis.in"),
    "com.au": ("https://accounts.zoho.com.au", "https://www.zohoapis.com.au"),
    "jp": ("https://accounts.zoho.jp", "https://www.zohoapis.jp"),
    "ca": ("https://accounts.zohocloud.ca", "https://www.zohoapis.ca"),
    "sa": ("https://accounts.zoho.sa", "https://www.zohoapis.sa"),
    "com.cn": ("https://accounts.zoho.com.cn", "https://www.zohoapis.com.cn"),
}

SECRET_KEYS: Final = ("client_id", "client_secret", "refresh_token")
ENV_NAMES: Final = {
    "client_id": "ZOHO_CLIENT_ID",
    "client_secret": "ZOHO_CLIENT_SECRET",
    "refresh_token": "ZOHO_REFRESH_TOKEN",
}


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that must send it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class Credentials:
    """The three OAuth secrets; any may be missing until a command needs it."""

    client_id: Secret | None = None
    client_secret: Secret | None = None
    refresh_token: Secret | None = None

    def require(self) -> tuple[Secret, Secret, Secret]:
        """All three, or a ConfigError naming the first one missing."""
        for key in SECRET_KEYS:
            if getattr(self, key) is None:
                raise ConfigError(
                    f"zoho.{key}",
                    f"missing: set {ENV_NAMES[key]}, put a '{key}' file in "
                    f"$CREDENTIALS_DIRECTORY, or set zoho.{key} in a 0600 config file",
                )
        assert self.client_id and self.client_secret and self.refresh_token
        return self.client_id, self.client_secret, self.refresh_token

    def secrets(self) -> list[str]:
        """The raw values, for the log redactor only."""
        return [s.reveal() for s in (self.client_id, self.client_secret, self.refresh_token) if s]


# Each field: (type, min, max). Ranges come from CONTRACT.md.
def _spec(kind: type, lo: float | None = None, hi: float | None = None) -> Any:
    return field(metadata={"kind": kind, "lo": lo, "hi": hi})


@dataclass(frozen=True)
class ZohoConfig:
    data_center: str
    accounts_url: str
    api_url: str
    organization_id: str
    image_endpoint: str

    def accounts_base(self) -> str:
        """Accounts server base URL, override first."""
        return (self.accounts_url or DATA_CENTERS[self.data_center][0]).rstrip("/")

    def api_base(self, api_domain: str | None = None) -> str:
        """Inventory API base: the override, else the token's api_domain, else the DC's host."""
        if self.api_url:
            return self.api_url.rstrip("/")
        host = (api_domain or DATA_CENTERS[self.data_center][1]).rstrip("/")
        return f"{host}/inventory/v1"


@dataclass(frozen=True)
class SourceConfig:
    kind: str
    items_file: str
    url_map: str


@dataclass(frozen=True)
class LimitsConfig:
    requests_per_minute: int = _spec(int, 1, 100_000)
    max_concurrent_requests: int = _spec(int, 1, 100)
    daily_request_budget: int = _spec(int, 1, 1_000_000_000)
    per_host_requests_per_second: float = _spec(float, 0.01, 100_000)
    per_host_concurrency: int = _spec(int, 1, 1000)
    daily_budget_reset_hour_utc: int = _spec(int, 0, 23)


@dataclass(frozen=True)
class DownloadConfig:
    workers: int = _spec(int, 1, 256)
    timeout_seconds: float = _spec(float, 0.1, 600)
    max_image_bytes: int = _spec(int, 1024, 1_073_741_824)
    max_attempts: int = _spec(int, 1, 100)


@dataclass(frozen=True)
class StorageConfig:
    images_dir: Path
    state_file: Path


@dataclass(frozen=True)
class SyncConfig:
    interval_seconds: float = _spec(float, 1, 31 * 86400)
    shutdown_timeout_seconds: float = _spec(float, 0.1, 3600)
    full_rescan_every: int = _spec(int, 1, 100_000)


@dataclass(frozen=True)
class HttpConfig:
    listen: str

    def host_port(self) -> tuple[str, int]:
        """Split ``host:port`` (``[::1]:9464`` for IPv6)."""
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class LogConfig:
    level: str
    format: str


DEFAULTS: Final[dict[str, dict[str, Any]]] = {
    "zoho": {
        "data_center": "com",
        "accounts_url": "",
        "api_url": "",
        "organization_id": "748369814",
        "image_endpoint": "inventory",
        "client_id": "",
        "client_secret": "",
        "refresh_token": "",
    },
    "source": {"kind": "zoho", "items_file": "", "url_map": ""},
    "limits": {
        "requests_per_minute": 100,
        "max_concurrent_requests": 10,
        "daily_request_budget": 5000,
        "per_host_requests_per_second": 10.0,
        "per_host_concurrency": 8,
        "daily_budget_reset_hour_utc": 0,
    },
    "download": {
        "workers": 8,
        "timeout_seconds": 30.0,
        "max_image_bytes": 7_340_032,
        "max_attempts": 5,
    },
    "storage": {"images_dir": "data/images/item", "state_file": "data/state.json"},
    "sync": {"interval_seconds": 3600.0, "shutdown_timeout_seconds": 20.0, "full_rescan_every": 24},
    "http": {"listen": "127.0.0.1:9464"},
    "log": {"level": "info", "format": "auto"},
}

# The contract's example config has image_endpoint under [source]; it is read there too
# (same meaning as under [zoho]; both given must agree).
ALIASES: Final[dict[str, str]] = {"source.image_endpoint": "zoho.image_endpoint"}

CHOICES: Final[dict[str, tuple[str, ...]]] = {
    "zoho.data_center": tuple(DATA_CENTERS),
    "zoho.image_endpoint": ("inventory", "books"),
    "source.kind": ("zoho", "file"),
    "log.level": tuple(LEVELS),
    "log.format": ("json", "console", "auto"),
}
CHOICES.update({alias: CHOICES[target] for alias, target in ALIASES.items()})


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    zoho: ZohoConfig
    source: SourceConfig
    limits: LimitsConfig
    download: DownloadConfig
    storage: StorageConfig
    sync: SyncConfig
    http: HttpConfig
    log: LogConfig
    credentials: Credentials = Credentials()
    path: Path | None = None

    @property
    def token_file(self) -> Path:
        """The token cache lives beside the state file."""
        return self.storage.state_file.parent / "token.json"

    @property
    def lock_file(self) -> Path:
        """The single-instance lock, in the state folder."""
        return self.storage.state_file.parent / (self.storage.state_file.name + ".lock")

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any],
        base_dir: Path,
        env: Mapping[str, str] | None = None,
        path: Path | None = None,
        file_mode: int | None = None,
    ) -> Config:
        """Validate ``data`` (a parsed TOML document) into a Config."""
        env = os.environ if env is None else env
        merged = _validate(data)
        # Secrets never enter ZohoConfig: only Credentials, which masks them.
        zoho = ZohoConfig(**{k: v for k, v in merged["zoho"].items() if k not in SECRET_KEYS})
        if not zoho.organization_id.strip():
            raise ConfigError("zoho.organization_id", "must not be empty")
        for key in ("accounts_url", "api_url"):
            url = getattr(zoho, key)
            if url and not url.startswith(("http://", "https://")):
                raise ConfigError(f"zoho.{key}", f"must be an http(s) URL, got {url!r}")
        listen = merged["http"]["listen"]
        _check_listen(listen)

        def resolve(value: str) -> Path:
            p = Path(value).expanduser()
            return p if p.is_absolute() else (base_dir / p)

        source = dict(merged["source"])
        if source["kind"] == "file" and not source["items_file"]:
            raise ConfigError("source.items_file", "required when source.kind = 'file'")
        for key in ("items_file", "url_map"):
            if source[key]:
                source[key] = str(resolve(source[key]))
        storage = StorageConfig(
            images_dir=resolve(merged["storage"]["images_dir"]),
            state_file=resolve(merged["storage"]["state_file"]),
        )
        creds = _load_credentials(merged["zoho"], env, file_mode)
        return cls(
            zoho=zoho,
            source=SourceConfig(**source),
            limits=LimitsConfig(**merged["limits"]),
            download=DownloadConfig(**merged["download"]),
            storage=storage,
            sync=SyncConfig(**merged["sync"]),
            http=HttpConfig(listen=listen),
            log=LogConfig(**merged["log"]),
            credentials=creds,
            path=path,
        )

    def __repr__(self) -> str:
        # The zoho section may hold secrets read from the file: never show them.
        return f"Config(path={self.path!s}, zoho.organization_id={self.zoho.organization_id!r})"


def load(path: Path, env: Mapping[str, str] | None = None, allow_empty: bool = True) -> Config:
    """Read and validate the TOML file at ``path``.

    ``allow_empty=False`` (a reload): an empty file is refused; all defaults replacing
    every setting is likelier a file caught half-saved than what the operator meant.
    """
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {path}") from None
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    if not allow_empty and not raw.strip():
        raise ConfigError("config", f"{path} is empty")
    try:
        data = tomllib.loads(raw.decode("utf-8-sig"))  # a BOM (Windows editors) is dropped
    except UnicodeDecodeError:
        raise ConfigError("config", f"{path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    return Config.from_mapping(
        data, path.resolve().parent, env=env, path=path, file_mode=stat.S_IMODE(mode)
    )


_SECTION_TYPES: Final[dict[str, type]] = {
    "zoho": ZohoConfig,
    "source": SourceConfig,
    "limits": LimitsConfig,
    "download": DownloadConfig,
    "storage": StorageConfig,
    "sync": SyncConfig,
    "http": HttpConfig,
    "log": LogConfig,
}


def _validate(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {k: dict(v) for k, v in DEFAULTS.items()}
    for section, values in data.items():
        if section not in DEFAULTS:
            raise ConfigError(section, f"unknown section (known: {', '.join(DEFAULTS)})")
        if not isinstance(values, Mapping):
            raise ConfigError(section, "must be a table ([section])")
        specs = {f.name: f.metadata for f in fields(_SECTION_TYPES[section])}
        for key, value in values.items():
            name = f"{section}.{key}"
            if name in ALIASES:
                _alias(data, name, value, merged)
                continue
            if key not in DEFAULTS[section]:
                raise ConfigError(name, f"unknown key (known: {', '.join(DEFAULTS[section])})")
            merged[section][key] = _check_value(
                name, value, DEFAULTS[section][key], specs.get(key, {})
            )
    return merged


def _alias(
    data: Mapping[str, Any], name: str, value: Any, merged: dict[str, dict[str, Any]]
) -> None:
    target = ALIASES[name]
    section, key = target.split(".")
    value = _check_value(name, value, DEFAULTS[section][key], {})
    given = data.get(section)
    if isinstance(given, Mapping) and key in given and given[key] != value:
        raise ConfigError(name, f"{value!r} conflicts with {target} = {given[key]!r}")
    merged[section][key] = value


def _check_value(name: str, value: Any, default: Any, meta: Mapping[str, Any]) -> Any:
    kind = meta.get("kind") or type(default)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(name, f"must be a number, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(name, "must be finite")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(name, f"must be an integer, got {type(value).__name__}")
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, got {type(value).__name__}")
        if "\0" in value:  # no path, URL or id holds one; the OS would refuse it later
            raise ConfigError(name, "must not contain a NUL character")
        if name in CHOICES and value not in CHOICES[name]:
            raise ConfigError(name, f"must be one of {', '.join(CHOICES[name])}; got {value!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and value < lo:
        raise ConfigError(name, f"must be >= {lo:g}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(name, f"must be <= {hi:g}, got {value}")
    return value


def _check_listen(listen: str) -> None:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("http.listen", f"must be host:port, got {listen!r}")


def _load_credentials(
    zoho: Mapping[str, Any], env: Mapping[str, str], file_mode: int | None
) -> Credentials:
    values: dict[str, Secret] = {}
    in_file = [k for k in SECRET_KEYS if zoho.get(k)]
    if in_file and file_mode is not None and file_mode & 0o077:
        raise ConfigError(
            f"zoho.{in_file[0]}",
            f"the config file holds a secret but is readable by group or others "
            f"(mode {file_mode:04o}); chmod 600 it or move the secret to the environment",
        )
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    for key in SECRET_KEYS:
        if env.get(ENV_NAMES[key]):
            values[key] = Secret(env[ENV_NAMES[key]].strip())
            continue
        if cred_dir:
            p = Path(cred_dir) / key
            try:
                text = p.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                text = ""
            except OSError as exc:
                raise ConfigError(f"zoho.{key}", f"cannot read {p}: {exc.strerror}") from None
            except UnicodeDecodeError:  # the message never quotes the bytes: they are secret
                raise ConfigError(f"zoho.{key}", f"{p} is not UTF-8 text") from None
            if text:
                values[key] = Secret(text)
                continue
        if zoho.get(key):
            values[key] = Secret(str(zoho[key]))
    return Credentials(
        client_id=values.get("client_id"),
        client_secret=values.get("client_secret"),
        refresh_token=values.get("refresh_token"),
    )
