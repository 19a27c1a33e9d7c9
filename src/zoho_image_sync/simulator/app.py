"""The simulator's HTTP server and the Simulator class that tests drive."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

from . import admin
from .catalogue import Catalogue
from .config import SimConfig
from .faults import FaultBook, Injection, make_fault
from .images import render
from .limits import Limiter, Rejection, rejection
from .listing import BadParam, items_page
from .records import RequestRecord, max_in_window, summarise
from .tokens import TokenAuthority

JSON_TYPE = "application/json;charset=UTF-8"
AUTH_SCHEME = "Zoho-oauthtoken"
DEFAULT_OVERSIZE = 8 * 1024 * 1024

_HTML_PAGE = (
    b"<!DOCTYPE html><html><head><title>Zoho</title></head>"
    b"<body><h1>Something went wrong</h1><p>Please try again later.</p></body></html>"
)


@dataclass
class _Call:
    """A request being handled; becomes a RequestRecord when it ends."""

    t: float
    endpoint: str
    path: str
    item_id: str | None = None
    page: int | None = None
    status: int = 0
    zoho_code: int | None = None
    bytes_sent: int = 0
    fault: str | None = None
    authorized: bool = False

    def record(self) -> RequestRecord:
        return RequestRecord(**asdict(self))


def _dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


class Simulator:
    """A faithful, controllable Zoho Inventory (and Accounts) served by aiohttp."""

    def __init__(
        self,
        config: SimConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._config = config if config is not None else SimConfig()
        self._clock = clock
        self._wall = wall
        self.catalogue = Catalogue(self._config, wall)
        self.tokens = TokenAuthority(self._config, clock, wall)
        self.limiter = Limiter(clock)
        self.faults = FaultBook()
        self._records: list[RequestRecord] = []
        self._api_done = 0
        self._waiters: list[tuple[int, asyncio.Event]] = []
        self._externals: dict[str, tuple[bytes, str]] = {}
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self.app = self._make_app()

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/oauth/v2/token", self._handle_token)
        app.router.add_get("/inventory/v1/items", self._handle_items)
        app.router.add_get("/inventory/v1/items/{item_id}/image", self._handle_image)
        app.router.add_get("/books/v3/items/{item_id}/image", self._handle_books_image)
        app.router.add_get("/ext/{name:.+}", self._handle_external)
        for method, path, handler in admin.ROUTES:
            app.router.add_route(method, path, self._admin_handler(handler))
        app.router.add_route("*", "/{tail:.*}", self._handle_other)
        return app

    # Lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 picks a free port); returns the base URL."""
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        self._base_url = f"http://{shown}:{bound_port}"
        return self._base_url

    async def stop(self) -> None:
        """Stop serving; requests held by "slow" faults are released first."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self.release_slow()
        await runner.cleanup()

    @property
    def base_url(self) -> str:
        """http://host:port once started."""
        if self._base_url is None:
            raise RuntimeError("simulator not started; call start() first")
        return self._base_url

    @property
    def accounts_url(self) -> str:
        """Where the token endpoint lives (the accounts server)."""
        return self.base_url

    @property
    def api_url(self) -> str:
        """The Inventory API base, up to and including /inventory/v1."""
        return self.base_url + "/inventory/v1"

    @property
    def books_url(self) -> str:
        """The Books API base, up to and including /books/v3."""
        return self.base_url + "/books/v3"

    @property
    def config(self) -> SimConfig:
        """The settings in force now."""
        return self._config

    def update_config(self, **changes: Any) -> SimConfig:
        """Change run-time settings (limits, retry_after, ...); returns the new config."""
        self._config = self._config.with_runtime(changes)
        self.tokens.config = self._config
        return self._config

    # Catalogue

    @property
    def items(self) -> list[dict[str, Any]]:
        """Every item as the API would list it (copies)."""
        return self.catalogue.items

    def item_ids_with_images(self) -> list[str]:
        """Ids of the items that have an image now."""
        return self.catalogue.item_ids_with_images()

    def image_bytes(self, item_id: str) -> bytes | None:
        """Exactly what the image route serves for this item now (None: no image)."""
        return self.catalogue.image_bytes(item_id)

    def set_image(self, item_id: str, kind: str = "jpg", size: int | None = None) -> str:
        """Replace the item's image (new image_document_id, modified now)."""
        return self.catalogue.set_image(item_id, kind, size)

    def remove_image(self, item_id: str) -> None:
        """Take the item's image away (modified now)."""
        self.catalogue.remove_image(item_id)

    def add_item(
        self, item_id: str | None = None, with_image: bool = True, kind: str = "jpg"
    ) -> str:
        """Add an item; returns its id."""
        return self.catalogue.add_item(item_id, with_image, kind)

    def remove_item(self, item_id: str) -> None:
        """Delete an item."""
        self.catalogue.remove_item(item_id)

    def set_item_field(self, item_id: str, key: str, value: Any) -> None:
        """Overwrite one field as served (key "item_id" renames the item)."""
        self.catalogue.set_item_field(item_id, key, value)

    def set_external(self, name: str, data: bytes, content_type: str = "image/jpeg") -> str:
        """Serve data at /ext/{name}, as a non-Zoho host would; returns its URL path."""
        self._externals[name] = (bytes(data), content_type)
        return f"/ext/{name}"

    # Tokens

    def revoke_all_tokens(self) -> None:
        """Every token issued so far now answers 57."""
        self.tokens.revoke_all()

    def expire_all_tokens(self) -> None:
        """Every current token now answers 57, as if it had expired."""
        self.tokens.expire_all()

    def token_fault(self, kind: str | None) -> None:
        """Make the token endpoint fail: invalid_code, invalid_client,
        invalid_client_secret, throttle, error500; None restores it."""
        self.tokens.set_fault(kind)

    def issue_token(self) -> str:
        """A valid access token, minted without HTTP and without the throttle."""
        return self.tokens.issue()

    # Faults

    def add_fault(
        self,
        kind: str,
        item_id: str | None = None,
        *,
        endpoint: str = "image",
        times: int | None = None,
        **params: Any,
    ) -> None:
        """Inject a fault into matching requests (item_id None: every request)."""
        self.faults.add(make_fault(kind, item_id, endpoint, times, params))

    def clear_faults(self) -> None:
        """Remove every injected fault (token faults excepted)."""
        self.faults.clear()

    def release_slow(self) -> None:
        """Let every request held by a "slow" fault finish now."""
        self._release.set()
        self._release = asyncio.Event()

    @property
    def in_flight(self) -> int:
        """API requests being handled now."""
        return self.limiter.in_flight

    async def wait_in_flight(self, count: int) -> None:
        """Return once at least count API requests are in flight."""
        await self.limiter.wait_in_flight(count)

    # Log and statistics

    @property
    def records(self) -> list[RequestRecord]:
        """The request log so far (a copy)."""
        return list(self._records)

    def stats(self) -> dict[str, Any]:
        """JSON-able counts over the log."""
        return summarise(
            self._records,
            tokens_minted=self.tokens.minted,
            max_in_flight=self.limiter.max_in_flight,
            window=self._config.window_seconds,
        )

    def max_in_window(self, window: float) -> int:
        """The most API arrivals seen within any window seconds."""
        return max_in_window(self._records, window)

    def reset_log(self) -> None:
        """Forget the log and the counters (limits keep their state)."""
        self._records.clear()
        self.tokens.minted = 0
        self.limiter.reset_peak()

    # Request plumbing

    def _begin(self, request: web.Request, endpoint: str, item_id: str | None = None) -> _Call:
        return _Call(
            t=self._clock(),
            endpoint=endpoint,
            path=request.path,
            item_id=item_id,
            authorized="Authorization" in request.headers,
        )

    def _finish(self, call: _Call) -> None:
        record = call.record()
        self._records.append(record)
        if record.is_api:
            self._api_done += 1
            for target, event in list(self._waiters):
                if self._api_done >= target:
                    event.set()

    async def wait_api_requests(self, count: int) -> None:
        """Return once at least ``count`` API requests have been answered (log order)."""
        if self._api_done >= count:
            return
        event = asyncio.Event()
        entry = (count, event)
        self._waiters.append(entry)
        try:
            await event.wait()
        finally:
            self._waiters.remove(entry)

    async def _send(
        self,
        request: web.Request,
        call: _Call,
        status: int,
        body: bytes,
        content_type: str,
        *,
        zoho_code: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        # Sent from inside the handler so the request counts as in flight until its
        # body has gone, as Zoho's concurrency limit sees it.
        response = web.Response(status=status, body=body, headers=headers)
        response.headers["Content-Type"] = content_type
        call.status = status
        call.zoho_code = zoho_code
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError:
            return response  # the client left; aiohttp drops the connection quietly
        call.bytes_sent = len(body)
        return response

    async def _send_json(
        self,
        request: web.Request,
        call: _Call,
        status: int,
        data: Any,
        headers: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        code = data.get("code") if isinstance(data, dict) else None
        zoho_code = code if isinstance(code, int) else None
        return await self._send(
            request, call, status, _dumps(data), JSON_TYPE, zoho_code=zoho_code, headers=headers
        )

    async def _send_truncated(
        self,
        request: web.Request,
        call: _Call,
        body: bytes,
        content_type: str,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers=headers)
        response.headers["Content-Type"] = content_type
        response.content_length = len(body)
        response.force_close()
        call.status = 200
        half = body[: len(body) // 2]
        try:
            await response.prepare(request)
            await response.write(half)
            call.bytes_sent = len(half)
        except ConnectionError:
            return response
        _drop_connection(request)
        return response

    async def _hold(self, delay: float) -> None:
        # A "slow" request waits for its delay, or until release_slow() lets it go.
        with suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._release.wait()

    # Token endpoint

    async def _handle_token(self, request: web.Request) -> web.StreamResponse:
        call = self._begin(request, "token")
        try:
            params = {key: str(value) for key, value in request.query.items()}
            if request.can_read_body:
                form = await request.post()
                params.update({key: str(value) for key, value in form.items()})
            api_domain = self._base_url or f"{request.scheme}://{request.host}"
            reply = self.tokens.exchange(params, api_domain)
            call.fault = reply.fault
            if isinstance(reply.body, str):
                return await self._send(
                    request, call, reply.status, reply.body.encode(), "text/plain"
                )
            return await self._send_json(request, call, reply.status, reply.body)
        finally:
            self._finish(call)

    # API endpoints

    async def _handle_items(self, request: web.Request) -> web.StreamResponse:
        return await self._api(request, "items", None)

    async def _handle_image(self, request: web.Request) -> web.StreamResponse:
        return await self._api(request, "image", request.match_info["item_id"])

    async def _handle_books_image(self, request: web.Request) -> web.StreamResponse:
        return await self._api(request, "books_image", request.match_info["item_id"])

    async def _api(
        self, request: web.Request, endpoint: str, item_id: str | None
    ) -> web.StreamResponse:
        call = self._begin(request, endpoint, item_id)
        config = self._config
        if endpoint == "items":
            with suppress(ValueError):
                call.page = int(request.query.get("page", "1"))
        admitted = False
        try:
            refused = self.limiter.arrive(config)
            if refused is not None:
                return await self._reject(request, call, refused)
            self.limiter.enter()
            admitted = True
            if config.latency > 0:
                await asyncio.sleep(config.latency)
            error = self._authorise(request, endpoint)
            if error is not None:
                status, data = error
                return await self._send_json(request, call, status, data, self._headers())
            injection = self.faults.pick(endpoint, item_id, call.page)
            if injection is not None:
                call.fault = injection.kind
                early = await self._inject(request, call, injection)
                if early is not None:
                    return early
            return await self._serve(request, call, endpoint, item_id, injection)
        finally:
            if admitted:
                self.limiter.leave()
            self._finish(call)

    def _headers(self, reset: float | None = None) -> dict[str, str]:
        return self.limiter.headers(self._config, reset)

    async def _reject(
        self, request: web.Request, call: _Call, refused: Rejection
    ) -> web.StreamResponse:
        headers = self._headers(refused.reset)
        if self._config.retry_after is not None:
            headers["Retry-After"] = str(self._config.retry_after)
        data = {"code": refused.code, "message": refused.message}
        return await self._send_json(request, call, 429, data, headers)

    def _authorise(self, request: web.Request, endpoint: str) -> tuple[int, Any] | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        state = self.tokens.check(token) if scheme == AUTH_SCHEME and token else "invalid"
        if state == "invalid":
            return 401, {"code": 14, "message": "Invalid value passed for authtoken."}
        scope = self._config.inventory_scope and (endpoint != "image" or self._config.image_scope)
        if state == "dead" or (endpoint != "books_image" and not scope):
            return 401, {"code": 57, "message": "You are not authorized to perform this operation"}
        if request.query.get("organization_id") != self._config.organization_id:
            return 400, {"code": 2, "message": "Invalid value passed for organization_id"}
        return None

    async def _inject(
        self, request: web.Request, call: _Call, injection: Injection
    ) -> web.StreamResponse | None:
        """Answer for a fault that replaces the response; None to serve normally."""
        kind, params = injection.kind, injection.params
        headers = self._headers()
        if kind == "slow":
            await self._hold(float(params.get("delay", 1.0)))
            return None
        if kind in ("truncate", "wrong_type"):
            return None
        if kind == "429":
            return await self._reject(
                request, call, rejection(int(params.get("code", 44)), self._config)
            )
        if kind == "status":
            status = int(params.get("status", 500))
            body = params.get("body")
            if isinstance(body, str):
                return await self._send(
                    request, call, status, body.encode(), "text/plain", headers=headers
                )
            if body is None:
                body = {"code": -1, "message": "Internal error (simulated)"}
            return await self._send_json(request, call, status, body, headers)
        if kind == "reset":
            call.status = 0
            _drop_connection(request)
            return web.Response(status=500)  # never sent: the connection is gone
        if kind == "json200":
            return await self._send_json(
                request, call, 200, {"code": 0, "message": "success"}, headers
            )
        if kind == "html200":
            return await self._send(
                request, call, 200, _HTML_PAGE, "text/html;charset=UTF-8", headers=headers
            )
        if kind == "empty":
            content_type = JSON_TYPE if call.endpoint == "items" else "image/jpeg"
            return await self._send(request, call, 200, b"", content_type, headers=headers)
        if kind == "oversize":
            size = int(params.get("size", DEFAULT_OVERSIZE))
            body = render("jpg", size, f"oversize:{call.item_id}")
            return await self._send(request, call, 200, body, "image/jpeg", headers=headers)
        if kind == "not_found":
            status, data = self._not_found()
            return await self._send_json(request, call, status, data, headers)
        raise AssertionError(f"unhandled fault kind {kind!r}")

    def _not_found(self) -> tuple[int, dict[str, Any]]:
        data = {"code": 1002, "message": "Attachment not found"}
        return (400 if self._config.not_found_style == "400" else 404), data

    async def _serve(
        self,
        request: web.Request,
        call: _Call,
        endpoint: str,
        item_id: str | None,
        injection: Injection | None,
    ) -> web.StreamResponse:
        headers = self._headers()
        if endpoint == "items":
            try:
                data = items_page(self.catalogue, request.query, self._config.per_page_max)
            except BadParam as exc:
                error = {"code": 2, "message": f"Invalid value passed for {exc}"}
                return await self._send_json(request, call, 400, error, headers)
            body, content_type = _dumps(data), JSON_TYPE
            zoho_code: int | None = 0
        else:
            assert item_id is not None  # image routes always carry one
            if not self.catalogue.has_item(item_id):
                data = {"code": 1002, "message": "Item does not exist."}
                return await self._send_json(request, call, 404, data, headers)
            found = self.catalogue.image(item_id)
            if found is None:
                status, data = self._not_found()
                return await self._send_json(request, call, status, data, headers)
            body, content_type = found
            zoho_code = None
            name = str(self.catalogue.field(item_id, "image_name"))
            if name.isprintable() and '"' not in name:
                headers["Content-Disposition"] = f'inline; filename="{name}"'
        kind = injection.kind if injection is not None else None
        if kind == "truncate":
            return await self._send_truncated(request, call, body, content_type, headers)
        if kind == "wrong_type":
            swapped = "image/png" if content_type == "image/jpeg" else "image/jpeg"
            content_type = swapped
        return await self._send(
            request, call, 200, body, content_type, zoho_code=zoho_code, headers=headers
        )

    # Other routes

    async def _handle_external(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        call = self._begin(request, "external", name)
        try:
            injection = self.faults.pick("external", name, None)
            if injection is not None:
                call.fault = injection.kind
                early = await self._inject(request, call, injection)
                if early is not None:
                    return early
            found = self._externals.get(name)
            if found is None:
                return await self._send(request, call, 404, b"Not Found", "text/plain")
            body, content_type = found
            kind = injection.kind if injection is not None else None
            if kind == "truncate":
                return await self._send_truncated(request, call, body, content_type, {})
            if kind == "wrong_type":
                content_type = "image/png" if content_type == "image/jpeg" else "image/jpeg"
            return await self._send(request, call, 200, body, content_type)
        finally:
            self._finish(call)

    async def _handle_other(self, request: web.Request) -> web.StreamResponse:
        call = self._begin(request, "other")
        try:
            data = {"code": 5, "message": "Invalid URL Passed"}
            return await self._send_json(request, call, 404, data)
        finally:
            self._finish(call)

    def _admin_handler(
        self, handler: admin.Handler
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            call = self._begin(request, "admin")
            try:
                try:
                    reply = await handler(self, request)
                except (ValueError, KeyError, TypeError) as exc:
                    reply = admin.Reply(400, {"error": str(exc)})
                if reply.content_type is not None:
                    return await self._send(
                        request, call, reply.status, reply.data, reply.content_type
                    )
                return await self._send(request, call, reply.status, _dumps(reply.data), JSON_TYPE)
            finally:
                self._finish(call)

        return handle


def _drop_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()
