"""The deploy/ kit: systemd unit, Prometheus config and alert rules, Grafana dashboard.

Static checks (promtool, systemd-analyze, metric names against the project's own registry)
and one live run: simulator -> daemon (``run``) -> a real Prometheus scraping it with the
alert rules loaded, where every dashboard query and every alert expression must return
data. The tools come from Debian's ``prometheus`` and ``systemd`` packages; without them
these tests skip, except under CI (``CI`` set), where .ci/run installs them and a missing
tool is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from conftest import CREDS_ENV
from daemon_harness import free_port
from zoho_image_sync.config import load as load_config
from zoho_image_sync.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "zoho-image-sync.service"
ALERTS = DEPLOY / "alerts.yml"
PROMETHEUS_YML = DEPLOY / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
PRODUCTION_CONFIG = DEPLOY / "config.production.toml"

# Debian package that ships each tool (.ci/run installs them).
PACKAGES = {"promtool": "prometheus", "prometheus": "prometheus", "systemd-analyze": "systemd"}


def tool(name: str) -> str:
    """The tool's path; skip without it, but fail under CI, which installs it."""
    path = shutil.which(name)
    if path is None:
        why = f"{name} is not installed (Debian: apt-get install {PACKAGES[name]})"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI must have it (.ci/run installs it)")
        pytest.skip(why)
    return path


def cli_argv() -> list[str]:
    """The console script next to this interpreter (the venv's), else ``python -m``."""
    script = Path(sys.executable).parent / "zoho-image-sync"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "zoho_image_sync"]


# -- metric names --------------------------------------------------------------------------

SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def registry_names() -> set[str]:
    """Every series name the daemon can expose, from the project's own Metrics registry."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(family.name + s for s in SUFFIXES)
        names.update(sample.name for sample in family.samples)
    return names


ALLOWED_NAMES = {*registry_names(), "up"}

PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, keywords removed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^{}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range and subquery selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)\b(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, instance) (rate(foo_bucket{a="b c", x=~"$i"}'
        "[$__rate_interval]))) / on (instance) group_left bar_total - time() > bool 2 * 3600"
    )
    assert metric_names(expr) == {"foo_bucket", "bar_total"}
    assert metric_names('up{job="zoho-image-sync"} == 0') == {"up"}
    assert "zoho_image_sync_images_downloaded_total" in ALLOWED_NAMES
    assert "zoho_image_sync_pass_duration_seconds_bucket" in ALLOWED_NAMES


# -- alert rules -----------------------------------------------------------------------------

COMPARISON = re.compile(r"^(?P<lhs>.*?)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<rhs>[0-9.eE+\-*/ ()]+)$")


def split_comparison(expr: str) -> tuple[str, str, str]:
    """``lhs op number`` -> (lhs, op, number); every rule in alerts.yml has that shape."""
    m = COMPARISON.match(expr.strip())
    assert m is not None, f"not '<expression> <comparison> <number>': {expr}"
    return m["lhs"], m["op"], m["rhs"]


def alert_rules() -> list[dict[str, str]]:
    """The rules of alerts.yml, read line by line (no YAML parser in the dev dependencies).

    The live test checks this reading against what Prometheus itself loaded.
    """
    rules: list[dict[str, str]] = []
    for line in ALERTS.read_text().splitlines():
        m = re.match(r"^\s*(?:- )?(alert|expr|for|severity|summary|description):\s*(.*)$", line)
        if m is None or line.lstrip().startswith("#"):
            continue
        key, value = m.group(1), m.group(2).strip()
        if key == "alert":
            rules.append({})
        assert rules, f"{key} before the first alert"
        rules[-1][key] = value.strip("'\"")
    return rules


def test_alert_rules_pass_promtool() -> None:
    promtool = tool("promtool")
    proc = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in proc.stdout + proc.stderr


def test_alert_rules_are_complete_and_use_known_metrics() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)) == 8
    for rule in rules:
        missing = {"expr", "for", "severity", "summary", "description"} - set(rule)
        assert not missing, f"{rule['alert']} lacks {missing}"
        assert rule["severity"] in ("critical", "warning"), rule
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule
        lhs, _op, _rhs = split_comparison(rule["expr"])
        used = metric_names(lhs)
        assert used, rule["expr"]
        assert used <= ALLOWED_NAMES, f"{rule['alert']}: unknown metrics {used - ALLOWED_NAMES}"
    by_name = {r["alert"]: r["expr"] for r in rules}
    # The staleness threshold is two intervals of the shipped production config.
    interval = load_config(PRODUCTION_CONFIG, env=CREDS_ENV).sync.interval_seconds
    assert by_name["ZohoImageSyncNoSuccessfulPass"].endswith(f"> 2 * {interval:.0f}")


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = tool("promtool")
    shutil.copy(PROMETHEUS_YML, tmp_path / "prometheus.yml")
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    proc = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "SUCCESS: 1 rule files found" in out
    text = PROMETHEUS_YML.read_text()
    assert "job_name: zoho-image-sync" in text
    listen = load_config(PRODUCTION_CONFIG, env=CREDS_ENV).http.listen
    assert f'targets: ["{listen}"]' in text


# -- systemd unit ----------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (comments and section headers skipped)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_unit_settings() -> None:
    s = unit_settings(UNIT.read_text())
    want = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/opt/zoho-image-sync/.venv/bin/zoho-image-sync "
        "-c /etc/zoho-image-sync/config.toml run",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "WatchdogSec": "60",
        "Restart": "on-failure",
        "RestartSec": "30",
        "RestartPreventExitStatus": "78",
        "TimeoutStopSec": "30",
        "DynamicUser": "yes",
        "StateDirectory": "zoho-image-sync",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
    }
    for key, value in want.items():
        assert s.get(key) == [value], f"{key}: {s.get(key)} != [{value!r}]"
    assert "@system-service" in s["SystemCallFilter"]
    assert sorted(s["LoadCredential"]) == [
        f"{name}:/etc/zoho-image-sync/{name}"
        for name in ("client_id", "client_secret", "refresh_token")
    ]
    # The daemon drains for shutdown_timeout_seconds on SIGTERM: systemd must wait longer.
    cfg = load_config(PRODUCTION_CONFIG, env=CREDS_ENV)
    assert cfg.sync.shutdown_timeout_seconds < int(s["TimeoutStopSec"][0])


def verify_unit(tmp_path: Path, text: str, name: str = "zoho-image-sync.service") -> str:
    """``systemd-analyze verify`` on a copy whose commands exist on this machine."""
    analyze = tool("systemd-analyze")
    script = Path(sys.executable).parent / "zoho-image-sync"
    installed = "/opt/zoho-image-sync/.venv/bin/zoho-image-sync"
    assert installed in text
    text = text.replace(installed, str(script) if script.exists() else sys.executable)
    kill = shutil.which("kill") or "/bin/kill"
    if not Path("/bin/kill").exists():
        text = text.replace("/bin/kill ", kill + " ")
    unit = tmp_path / name
    unit.write_text(text)
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


# Warnings systemd-analyze may print on some machines and that say nothing about our unit:
# none on Debian 12 (systemd 252) today. Anything else (an unknown key, a value systemd
# cannot parse and ignores, a missing binary) fails the test.
UNDERSTOOD_WARNINGS: tuple[str, ...] = ()


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    out = verify_unit(tmp_path, UNIT.read_text())
    unexplained = [
        line
        for line in out.splitlines()
        if line.strip() and not any(w in line for w in UNDERSTOOD_WARNINGS)
    ]
    assert not unexplained, "systemd-analyze verify:\n" + out
    # The check is real: systemd-analyze exits 0 on an unknown key or a bad value, and only
    # says so. The same copy with one typo must be reported.
    broken = UNIT.read_text().replace("WatchdogSec=60", "WatchdogSec=60\nWatchDogSec=60")
    out = verify_unit(tmp_path, broken, "broken.service")
    assert "Unknown key 'WatchDogSec'" in out, out


def test_production_config_matches_the_unit() -> None:
    cfg = load_config(PRODUCTION_CONFIG, env=CREDS_ENV)
    state_dir = Path("/var/lib") / unit_settings(UNIT.read_text())["StateDirectory"][0]
    assert cfg.storage.images_dir == state_dir / "images" / "item"
    assert cfg.storage.state_file == state_dir / "state.json"
    assert (cfg.zoho.data_center, cfg.zoho.accounts_url, cfg.zoho.api_url) == ("com", "", "")
    assert cfg.limits.requests_per_minute == 100
    assert cfg.log.format == "json"
    # No secret in the file: it is installed world-readable for the dynamic user.
    assert not re.search(
        r"^\s*(client_id|client_secret|refresh_token)\s*=", PRODUCTION_CONFIG.read_text(), re.M
    )


# -- Grafana dashboard -----------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict)
    return doc


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    return [
        (p["title"], t["expr"])
        for p in panels(dashboard())
        for t in p.get("targets", [])
        if t.get("expr")
    ]


def test_dashboard_structure_and_metric_names() -> None:
    doc = dashboard()
    assert 36 <= doc["schemaVersion"] <= 41
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for p in panels(doc):
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            assert p.get("targets"), p["title"]
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    used: set[str] = set()
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr}"
        assert names <= ALLOWED_NAMES, f"{title}: unknown metrics {names - ALLOWED_NAMES}"
        used |= names
    # What the dashboard is for: each of these is shown somewhere.
    prefix = "zoho_image_sync_"
    required = {
        prefix + "images_downloaded_total",
        prefix + "last_pass_images_downloaded",
        prefix + "bytes_downloaded_total",
        prefix + "image_failures_total",
        prefix + "rate_limited_total",
        prefix + "token_refreshes_total",
        prefix + "api_requests_total",
        prefix + "queue_depth",
        prefix + "downloads_in_flight",
        prefix + "daily_budget_remaining",
        prefix + "pass_duration_seconds_sum",
        prefix + "last_pass_success_timestamp_seconds",
        prefix + "items",
        prefix + "token_expiry_timestamp_seconds",
        prefix + "config_last_reload_successful",
    }
    assert required <= used, f"not on the dashboard: {required - used}"
    instance = variables["instance"]
    assert metric_names(instance["definition"].removeprefix("label_values(").split(",")[0]) <= (
        ALLOWED_NAMES
    )


GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1m",
    "$instance": ".*",
}


def concrete(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, as Grafana would send it."""
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value).replace("${" + var[1:] + "}", value)
    assert "$" not in expr, f"unreplaced variable in {expr}"
    return expr


# -- live: simulator -> daemon -> Prometheus -------------------------------------------------


class Proc:
    """A child process whose output is read by threads, line by line, as it comes."""

    def __init__(
        self, argv: list[str], env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.argv = argv
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._pump, args=(stream,), daemon=True)
            for stream in (self.popen.stdout, self.popen.stderr)
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, match: Callable[[str], bool], timeout: float, what: str) -> str:
        """Block until an output line matches (an event), the process dies, or timeout."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if match(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self.popen.poll() is not None and not any(t.is_alive() for t in self._threads):
                    pytest.fail(
                        f"{self.argv[0]} exited {self.popen.returncode} before {what}:\n"
                        + self.tail()
                    )
                if left <= 0:
                    pytest.fail(f"no {what} within {timeout} s:\n" + self.tail())
                self._cond.wait(min(left, 0.5))

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return "\n".join(self.lines[-n:])

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, wait (SIGKILL past the timeout), close the pipes; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait(10)
        for t in self._threads:
            t.join(10)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()
        return code


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Children started by a test; every one is stopped (SIGTERM, then wait) at teardown."""
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop()


def http_get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback)
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
        exc.close()
        return exc.code, body


def http_post_json(url: str, doc: dict[str, Any]) -> Any:
    req = urllib.request.Request(  # noqa: S310 (loopback)
        url, data=json.dumps(doc).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (loopback)
        assert resp.status == 200
        return json.loads(resp.read())


def prom_query(base: str, expr: str) -> list[dict[str, Any]]:
    """An instant query; the result vector (or a scalar as a one-element list)."""
    status, body = http_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    doc = json.loads(body)
    assert status == 200 and doc["status"] == "success", f"{expr}: {doc}"
    data = doc["data"]
    if data["resultType"] in ("scalar", "string"):
        return [{"value": data["result"]}]
    result: list[dict[str, Any]] = data["result"]
    return result


def json_event(name: str, **fields: Any) -> Callable[[str], bool]:
    """Match a JSON log line of the daemon by its event and some fields."""

    def match(line: str) -> bool:
        try:
            doc = json.loads(line)
        except ValueError:
            return False
        return (
            isinstance(doc, dict)
            and doc.get("event") == name
            and all(doc.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in fields.items())
        )

    return match


@pytest.mark.timeout(180)
def test_live_prometheus_evaluates_every_query(tmp_path: Path, procs: list[Proc]) -> None:
    promtool = tool("promtool")
    prometheus = tool("prometheus")
    exe = cli_argv()

    # The simulator prints its base URL on stdout once it listens: that line is the signal.
    sim = Proc(
        [
            *exe,
            "simulate",
            "--port",
            "0",
            "--per-minute",
            "0",
            "--items",
            "300",
            "--with-images",
            "120",
        ],
        cwd=tmp_path,
    )
    procs.append(sim)
    base = json.loads(sim.wait_for(lambda s: s.startswith('"http'), 30, "simulator URL"))

    # Give every panel something to show: a persistent failure (not_an_image, on every pass:
    # full_rescan_every = 1 makes each pass a full scan, which retries failed items),
    # one 500 and one 429 (retries), and one url_map item served as an external image.
    items = json.loads(http_get(f"{base}/__sim/items")[1])["items"]
    with_image = [i["item_id"] for i in items if i.get("image_document_id")]
    without_image = [i["item_id"] for i in items if not i.get("image_document_id")]
    http_post_json(f"{base}/__sim/config", {"retry_after": 1})
    http_post_json(f"{base}/__sim/faults", {"kind": "json200", "item_id": with_image[0]})
    http_post_json(f"{base}/__sim/faults", {"kind": "status", "item_id": with_image[1], "times": 1})
    http_post_json(f"{base}/__sim/faults", {"kind": "429", "item_id": with_image[2], "times": 1})
    external = http_post_json(f"{base}/__sim/catalogue", {"op": "set_external", "name": "ext"})
    url_map = tmp_path / "image_urls.json"
    # Another host name for the same server: the daemon treats it as a non-Zoho image host.
    other_host = base.replace("127.0.0.1", "localhost")
    url_map.write_text(json.dumps({without_image[0]: other_host + external["path"]}))

    listen = f"127.0.0.1:{free_port()}"
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[zoho]
accounts_url = "{base}"
api_url = "{base}/inventory/v1"
[source]
url_map = "{url_map}"
[limits]
requests_per_minute = 100000
daily_request_budget = 1000000
[download]
timeout_seconds = 5
max_attempts = 3
[storage]
images_dir = "data/images/item"
state_file = "data/state.json"
[sync]
interval_seconds = 2
shutdown_timeout_seconds = 5
full_rescan_every = 1
[http]
listen = "{listen}"
[log]
format = "json"
"""
    )
    config.chmod(0o600)
    daemon = Proc([*exe, "-c", str(config), "run"], env=CREDS_ENV, cwd=tmp_path)
    procs.append(daemon)
    # The daemon logs each finished pass: after the first successful (or partial) one it
    # holds a token and its metrics have every series.
    daemon.wait_for(json_event("pass finished", status=("success", "partial")), 60, "first pass")
    status, body = http_get(f"http://{listen}/readyz")
    assert status == 200, body

    status, scrape = http_get(f"http://{listen}/metrics")
    assert status == 200
    lint = subprocess.run(
        [promtool, "check", "metrics"],
        input=scrape,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()
    # The injected faults really happened, so the panels below show them, not just zeros.
    for series in (
        r'zoho_image_sync_image_failures_total\{reason="not_an_image"\}',
        r'zoho_image_sync_rate_limited_total\{endpoint="image"\}',
        r'zoho_image_sync_retries_total\{reason="[^"]+"\}',
        r'zoho_image_sync_external_requests_total\{code="200"\}',
    ):
        assert re.search(rf"^{series} [1-9]", scrape.decode(), re.M), series

    # Prometheus with the shipped config, pointed at this daemon, scraping every second.
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    shutil.copy(ALERTS, prom_dir / "alerts.yml")
    text = PROMETHEUS_YML.read_text()
    for old, new in (
        ("127.0.0.1:9464", listen),
        ("scrape_interval: 15s", "scrape_interval: 1s"),
        ("evaluation_interval: 15s", "evaluation_interval: 1s"),
        ("scrape_timeout: 10s", "scrape_timeout: 1s"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    (prom_dir / "prometheus.yml").write_text(text)
    prom_base = f"http://127.0.0.1:{free_port()}"
    prom = Proc(
        [
            prometheus,
            f"--config.file={prom_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={prom_dir / 'data'}",
            f"--web.listen-address={prom_base.removeprefix('http://')}",
        ],
        cwd=prom_dir,
    )
    procs.append(prom)
    prom.wait_for(lambda s: "Server is ready to receive web requests" in s, 60, "Prometheus ready")

    # Scrapes and rule evaluations happen on Prometheus' own clock and announce nothing:
    # polling its query API (bounded) is the only way to know three scrapes are stored.
    deadline = time.monotonic() + 30
    while not prom_query(prom_base, 'count_over_time(up{job="zoho-image-sync"}[1m]) >= 3'):
        assert time.monotonic() < deadline, "Prometheus did not scrape the daemon 3 times:\n" + (
            prom.tail()
        )
        time.sleep(0.25)
    up = prom_query(prom_base, 'up{job="zoho-image-sync"}')
    assert [s["value"][1] for s in up] == ["1"], up

    empty = [
        f"{title}: {concrete(expr)}"
        for title, expr in dashboard_exprs()
        if not prom_query(prom_base, concrete(expr))
    ]
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

    # The rules as Prometheus loaded them: the same as alert_rules() read, all healthy.
    doc = json.loads(http_get(f"{prom_base}/api/v1/rules")[1])
    loaded = {r["name"]: r for g in doc["data"]["groups"] for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in alert_rules()}
    empty = []
    for name, rule in loaded.items():
        assert rule["health"] != "err", rule
        lhs, _op, _rhs = split_comparison(rule["query"])
        if not prom_query(prom_base, lhs):
            empty.append(f"{name}: {lhs}")
    assert not empty, "alert expressions without data:\n" + "\n".join(empty)

    # The thresholds are sane: the injected not_an_image failure (every pass) makes the
    # image-failure alert pending; the healthy daemon fires none of the critical ones.
    deadline = time.monotonic() + 30
    while True:
        alerts = json.loads(http_get(f"{prom_base}/api/v1/alerts")[1])["data"]["alerts"]
        active = {(a["labels"]["alertname"], a["labels"].get("reason")) for a in alerts}
        if ("ZohoImageSyncImageFailures", "not_an_image") in active:
            break
        # Rule evaluation runs on Prometheus' clock too (every 1 s here): poll, bounded.
        assert time.monotonic() < deadline, f"image-failure alert not pending: {alerts}"
        time.sleep(0.25)
    names = {a["labels"]["alertname"] for a in alerts}
    for quiet in (
        "ZohoImageSyncDown",
        "ZohoImageSyncNotReady",
        "ZohoImageSyncNoSuccessfulPass",
        "ZohoImageSyncConfigReloadFailed",
        "ZohoImageSyncDailyBudgetLow",
        "ZohoImageSyncTokenRefreshFailing",
    ):
        assert quiet not in names, alerts

    # SIGTERM: the daemon drains and exits 0 (the unit's Restart=on-failure relies on it).
    assert daemon.stop() == 0, daemon.tail()


def test_per_image_figures_reach_their_series_at_scrape_time_and_stay_bounded() -> None:
    from zoho_image_sync.metrics import FLUSH_EVERY

    m = Metrics()
    sample = m.registry.get_sample_value  # collects, as a scrape does
    for _ in range(3):
        m.image_written(0.02, 1000)
    assert sample("zoho_image_sync_images_downloaded_total") == 3
    assert sample("zoho_image_sync_bytes_downloaded_total") == 3000
    assert sample("zoho_image_sync_download_duration_seconds_count") == 3
    assert sample("zoho_image_sync_download_duration_seconds_bucket", {"le": "0.025"}) == 3
    assert sample("zoho_image_sync_download_duration_seconds_bucket", {"le": "0.01"}) == 0
    # Nobody scrapes: the figures still move into the series every FLUSH_EVERY images,
    # so what is held between scrapes stays bounded.
    for _ in range(FLUSH_EVERY):
        m.image_written(0.5, 1)
    assert len(m._durations) == 0
    assert m.images_downloaded._value.get() == 3 + FLUSH_EVERY
