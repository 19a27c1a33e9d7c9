"""What the scenarios run against: a static Zoho on nginx, the simulator, configs.

The static site is generated from the simulator's own catalogue (same item JSON, same
JPEG bytes, sizes 30-300 KB with a mean of about 100 KB) and written as plain files:

    www/pages/{N}.json     the body of GET /inventory/v1/items?page=N&per_page=200
    www/img/{item_id}      the body of GET /inventory/v1/items/{item_id}/image

nginx (one worker, loopback, free port, config in a temporary prefix) maps
``$arg_page`` to a page file and the item id to an image file; image requests without
the bench token's Authorization header get a 401, as Zoho would answer. The token
endpoint is a ``return 200 '<json>'`` (``return`` answers POST as well as GET, where a
static file would get 405). With ``delay`` > 0, nginx's echo module (Debian's
libnginx-mod-http-echo) holds every items and image response for ``delay`` seconds
with ``echo_sleep`` before an internal redirect to the static file: no proxy process
competes for the two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from zoho_image_sync.simulator import DEMO_CREDS_ENV, SimConfig
from zoho_image_sync.simulator.catalogue import Catalogue
from zoho_image_sync.simulator.listing import items_page

from .common import ROOT, child_pids, free_port, http_json, proc_cpu_seconds, wait_for_port

ORG_ID = "748369814"
TOKEN = "1000.bench0access0token0static0nginx"
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")
PER_PAGE = 200


@dataclass
class Site:
    """A generated static catalogue."""

    docroot: Path
    ids: list[str]
    sizes: dict[str, int]
    pages: int

    @property
    def total_bytes(self) -> int:
        """Bytes of all images."""
        return sum(self.sizes.values())


def stop_child(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
    """Signal a child, give it 10 s, then kill it; always reap it."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def build_site(docroot: Path, n_images: int, seed: int = 1) -> Site:
    """Write ``n_images`` items, every one with an image, as static files."""
    catalogue = Catalogue(
        SimConfig(seed=seed, items=n_images, with_images=n_images, png_share=0.0), time.time
    )
    (docroot / "pages").mkdir(parents=True, exist_ok=True)
    (docroot / "img").mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    page = 1
    while True:
        body = items_page(catalogue, {"page": str(page), "per_page": str(PER_PAGE)}, PER_PAGE)
        (docroot / "pages" / f"{page}.json").write_bytes(
            json.dumps(body, separators=(",", ":")).encode()
        )
        ids += [item["item_id"] for item in body["items"]]
        if not body["page_context"]["has_more_page"]:
            break
        page += 1
    sizes: dict[str, int] = {}
    for item_id in ids:
        found = catalogue.image(item_id)
        assert found is not None
        (docroot / "img" / item_id).write_bytes(found[0])
        sizes[item_id] = len(found[0])
    return Site(docroot=docroot, ids=ids, sizes=sizes, pages=page)


def token_body(base: str) -> str:
    """What the static token endpoint answers."""
    return json.dumps(
        {
            "access_token": TOKEN,
            "api_domain": base,
            "token_type": "Bearer",
            "expires_in": 3600,
        },
        separators=(",", ":"),
    )


def nginx_conf(prefix: Path, docroot: Path, port: int, delay: float) -> str:
    """The nginx configuration (one worker, loopback only)."""
    base = f"http://127.0.0.1:{port}"
    token = token_body(base).replace("'", "")
    auth = f"Zoho-oauthtoken {TOKEN}"
    if delay > 0:
        items = f"echo_sleep {delay};\n            echo_exec /__static/pages/$arg_page;"
        image = f"echo_sleep {delay};\n            echo_exec /__static/img/$1;"
        load = f"load_module {ECHO_MODULE};\n"
    else:
        items = "try_files /pages/$arg_page.json =404;"
        image = "try_files /img/$1 =404;"
        load = ""
    return f"""{load}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {docroot};
        location = /oauth/v2/token {{
            default_type application/json;
            return 200 '{token}';
        }}
        location = /inventory/v1/items {{
            default_type application/json;
            {items}
        }}
        location ~ ^/inventory/v1/items/([A-Za-z0-9_-]+)/image$ {{
            default_type image/jpeg;
            if ($http_authorization != "{auth}") {{ return 401; }}
            {image}
        }}
        location ~ ^/__static/pages/([0-9]+)$ {{
            internal;
            default_type application/json;
            try_files /pages/$1.json =404;
        }}
        location ~ ^/__static/img/([A-Za-z0-9_-]+)$ {{
            internal;
            default_type image/jpeg;
            try_files /img/$1 =404;
        }}
    }}
}}
"""


class Nginx:
    """nginx serving a Site on a free loopback port, in the foreground, as a child."""

    def __init__(self, prefix: Path, docroot: Path, delay: float = 0.0) -> None:
        self.prefix = prefix
        self.docroot = docroot
        self.delay = delay
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Nginx:
        for sub in ("logs", "tmp"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(nginx_conf(self.prefix, self.docroot, self.port, self.delay))
        argv = [
            "nginx",
            "-p",
            str(self.prefix),
            "-e",
            str(self.prefix / "logs" / "error.log"),
            "-c",
            str(conf),
            "-g",
            "daemon off;",
        ]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_child(proc, signal.SIGQUIT)  # graceful for nginx: workers finish, then exit

    def worker_cpu(self) -> float:
        """CPU seconds used so far by the worker process(es)."""
        assert self.proc is not None
        return sum(proc_cpu_seconds(pid) or 0.0 for pid in child_pids(self.proc.pid))


class SimProcess:
    """The built-in simulator in its own process (``python -m bench.simserver``)."""

    def __init__(self, config: dict[str, Any], log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = ""
        self.startup_seconds = 0.0
        self.build_seconds = 0.0

    def __enter__(self) -> SimProcess:
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "bench.simserver",
            "--port",
            str(port),
            "--config",
            json.dumps(self.config),
        ]
        t0 = time.monotonic()
        with self.log_path.open("wb") as err:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.__exit__(None, None, None)
            raise RuntimeError(f"the simulator did not start; see {self.log_path}")
        info = json.loads(line)
        self.base = info["base_url"]
        self.build_seconds = float(info["build_seconds"])
        self.startup_seconds = time.monotonic() - t0
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_child(proc, signal.SIGTERM)
            if proc.stdout is not None:
                proc.stdout.close()

    def stats(self) -> dict[str, Any]:
        """GET /__sim/stats."""
        data: dict[str, Any] = http_json(f"{self.base}/__sim/stats")
        return data

    def records(self) -> list[dict[str, Any]]:
        """GET /__sim/log: every request record."""
        data: dict[str, Any] = http_json(f"{self.base}/__sim/log")
        records: list[dict[str, Any]] = data["records"]
        return records

    def reset_log(self) -> None:
        """POST /__sim/log/reset."""
        http_json(f"{self.base}/__sim/log/reset", method="POST", body=b"{}")

    def cpu(self) -> float:
        """CPU seconds used so far by the simulator."""
        assert self.proc is not None
        return proc_cpu_seconds(self.proc.pid) or 0.0


def zis_env(simulator: bool) -> dict[str, str]:
    """The environment for zoho-image-sync: credentials from the environment."""
    env = dict(os.environ)
    if simulator:
        env.update(DEMO_CREDS_ENV)
    else:
        env.update(
            ZOHO_CLIENT_ID="1000.BENCHCLIENT",
            ZOHO_CLIENT_SECRET="bench0secret",
            ZOHO_REFRESH_TOKEN="1000.bench0refresh",
        )
    env.pop("NOTIFY_SOCKET", None)
    return env


def write_zis_config(
    path: Path,
    base: str,
    data_dir: Path,
    *,
    requests_per_minute: int = 100_000,
    max_concurrent: int = 100,
    daily_budget: int = 1_000_000_000,
    workers: int = 8,
) -> Path:
    """A config.toml for one run: limits as given, images and state under data_dir."""
    path.write_text(
        f"""[zoho]
accounts_url = "{base}"
api_url = "{base}/inventory/v1"
organization_id = "{ORG_ID}"

[limits]
requests_per_minute = {requests_per_minute}
max_concurrent_requests = {max_concurrent}
daily_request_budget = {daily_budget}

[download]
workers = {workers}

[storage]
images_dir = "{data_dir / "images" / "item"}"
state_file = "{data_dir / "state.json"}"

[http]
listen = "127.0.0.1:{free_port()}"

[log]
level = "info"
format = "json"
"""
    )
    return path


def zis_argv(config: Path, command: str = "once") -> list[str]:
    """How to start zoho-image-sync (the console script beside this interpreter)."""
    script = Path(sys.executable).parent / "zoho-image-sync"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "zoho_image_sync"]
    return [*head, "-c", str(config), command]


def rmtree(path: Path) -> None:
    """Remove a tree if it exists (fast path for big image folders)."""
    if path.exists():
        subprocess.run(["rm", "-rf", "--", str(path)], check=True)
