"""The operator's endpoints: /metrics, /healthz, /readyz, /state (never the token)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from .service import Service

SERVICE_KEY: web.AppKey[Service] = web.AppKey("service")


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition from the service's own registry."""
    service = request.app[SERVICE_KEY]
    service.refresh_gauges()
    body = service.metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    """200 while the process is alive and its loop answers."""
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    """200 once a token is held and no pass has failed since the last success."""
    service = request.app[SERVICE_KEY]
    ready, why = service.readiness()
    return web.json_response({"ready": ready, "reason": why}, status=200 if ready else 503)


async def state(request: web.Request) -> web.Response:
    """Counts per item state, current pass progress, last report, budget, token expiry."""
    service = request.app[SERVICE_KEY]
    doc: dict[str, Any] = service.state_view()
    return web.Response(text=json.dumps(doc, ensure_ascii=False), content_type="application/json")


def build_app(service: Service) -> web.Application:
    """The aiohttp application for ``http.listen``."""
    app = web.Application()
    app[SERVICE_KEY] = service
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/state", state)
    return app
