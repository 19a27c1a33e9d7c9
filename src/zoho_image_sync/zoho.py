"""The HTTP client: the only module that turns aiohttp's exceptions into our error tree.

Every Zoho API request passes the ``ApiGate`` (budget, concurrency, rolling window),
carries the token from ``TokenManager``, answers a 401 with one refresh and one retry,
a 429 with a wait (``Retry-After`` or the rate-limit headers, else a sane back-off),
and transient failures with exponential back-off and jitter up to ``max_attempts``.
Non-Zoho image URLs get no token and their own per-host limits.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, NoReturn, TypeVar
from urllib.parse import quote, urljoin, urlsplit

import aiohttp
import structlog
import yarl

from .auth import TokenManager
from .config import Config
from .errors import (
    BudgetExhausted,
    FatalPassError,
    ItemError,
    RetryLater,
    ScopeError,
    TokenUnavailable,
    TransientError,
)
from .limits import ApiGate, HostGate, backoff_delay
from .metrics import Metrics
from .storage import MAGIC_PREFIX_BYTES, ImageSink, sniff_image

log = structlog.get_logger(__name__)

T = TypeVar("T")
CHUNK: Final = 64 * 1024
MAX_REDIRECTS: Final = 5
MAX_429_RETRIES: Final = 20
# 200 items are ~100 KB of JSON; a page a hundred times that is not one Zoho sends.
MAX_PAGE_BYTES: Final = 16 * 1024 * 1024


@dataclass(slots=True)
class ImageResult:
    """What a successful image fetch wrote into its sink."""

    ext: str  # from the bytes' magic number, never from the Content-Type


def books_base(api_base: str) -> str:
    """The Books v3 base beside an Inventory v1 base."""
    if api_base.endswith("/inventory/v1"):
        return api_base[: -len("/inventory/v1")] + "/books/v3"
    return api_base.rsplit("/", 2)[0] + "/books/v3"


class ZohoClient:
    """Zoho Inventory over aiohttp, within Zoho's limits."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: Config,
        tokens: TokenManager,
        gate: ApiGate,
        hosts: HostGate,
        metrics: Metrics,
    ) -> None:
        self.session = session
        self.config = config
        self.tokens = tokens
        self.gate = gate
        self.hosts = hosts
        self.metrics = metrics
        self.requests_sent = 0
        # endpoint -> (the token refused even fresh, the message naming the missing scope)
        self._refused: dict[str, tuple[str, str]] = {}
        self._probes: dict[tuple[str, str], asyncio.Future[bool]] = {}
        # Built once, not per request: the per-image profile showed each of them.
        self._timeouts: tuple[float, aiohttp.ClientTimeout] | None = None
        self._auth: tuple[str, dict[str, str]] = ("", {})
        self._counters: dict[tuple[str, int], Any] = {}
        self._api_base: tuple[object, str | None, str] = (None, None, "")

    # -- URLs ----------------------------------------------------------------

    @property
    def api_base(self) -> str:
        """Inventory base URL (override, else the token's api_domain, else the DC)."""
        zoho, domain = self.config.zoho, self.tokens.api_domain
        cached = self._api_base
        if cached[0] is not zoho or cached[1] != domain:  # a reload or a new token's domain
            cached = self._api_base = (zoho, domain, zoho.api_base(domain))
        return cached[2]

    def image_url(self, item_id: str) -> str:
        """The Zoho image endpoint of an item, Inventory or Books per the config."""
        base = self.api_base
        if self.config.zoho.image_endpoint == "books":
            base = books_base(base)
        # organization_id in the URL itself: no query merge per request (see _zoho_request).
        org = quote(self.config.zoho.organization_id, safe="")
        return f"{base}/items/{item_id}/image?organization_id={org}"

    def is_zoho_url(self, url: str) -> bool:
        """True when ``url`` is on the Zoho API host (so it takes the token and the gate)."""
        base = self.api_base
        if url.startswith(base + "/"):  # our own image URLs: no parsing per image
            return True
        try:
            u, b = urlsplit(url), urlsplit(base)
        except ValueError:
            return False
        # The scheme too: the token never goes over plain http to an https API's host.
        return (u.scheme.lower(), u.netloc.lower()) == (b.scheme.lower(), b.netloc.lower())

    def _timeout(self) -> aiohttp.ClientTimeout:
        t = self.config.download.timeout_seconds
        if self._timeouts is None or self._timeouts[0] != t:  # a reload may change it
            self._timeouts = (t, aiohttp.ClientTimeout(total=t, connect=t, sock_read=t))
        return self._timeouts[1]

    def _headers(self, token: str) -> dict[str, str]:
        if self._auth[0] != token:
            self._auth = (token, {"Authorization": f"Zoho-oauthtoken {token}"})
        return self._auth[1]

    def _count(self, endpoint: str, status: int) -> None:
        """``api_requests_total{endpoint, code}`` += 1, the labelled child looked up once."""
        key = (endpoint, status)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = self.metrics.api_requests.labels(endpoint, str(status))
        child.inc()

    # -- Zoho API ------------------------------------------------------------

    async def items_page(
        self, page: int, per_page: int = 200, extra: dict[str, str] | None = None
    ) -> tuple[list[Any], bool]:
        """One page of the item list: (items, has_more_page)."""
        params = {"page": str(page), "per_page": str(per_page), **(extra or {})}

        async def handle(resp: aiohttp.ClientResponse) -> tuple[list[Any], bool]:
            raw = await resp.content.read(MAX_PAGE_BYTES + 1)
            if len(raw) > MAX_PAGE_BYTES:
                raise FatalPassError(
                    f"items page {page}: body larger than {MAX_PAGE_BYTES} bytes; refused"
                )
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise TransientError(f"items page {page}: HTTP {resp.status}, not JSON") from None
            if resp.status != 200 or not isinstance(body, dict) or body.get("code") != 0:
                code = body.get("code") if isinstance(body, dict) else None
                msg = body.get("message") if isinstance(body, dict) else None
                raise FatalPassError(f"items page {page}: HTTP {resp.status}, code {code}: {msg}")
            items = body.get("items")
            ctx = body.get("page_context")
            if not isinstance(items, list) or not isinstance(ctx, dict):
                raise TransientError(f"items page {page}: no items/page_context in the body")
            return items, bool(ctx.get("has_more_page"))

        try:
            return await self._zoho_request("items", f"{self.api_base}/items", params, handle)
        except ItemError as exc:
            raise FatalPassError(f"items page {page}: {exc.detail}") from None

    async def fetch_image(self, url: str, sink: ImageSink) -> ImageResult:
        """Stream an image into ``sink``; Zoho URLs with the token, others without."""
        if self.is_zoho_url(url):
            return await self._zoho_request(
                "image", url, {}, lambda resp: self._read_image(resp, sink), sink
            )
        return await self._external_image(url, sink)

    async def _zoho_request(
        self,
        endpoint: str,
        url: str,
        params: dict[str, str],
        handle: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        sink: ImageSink | None = None,
    ) -> T:
        query: dict[str, str] | None = params
        if "organization_id" not in params and "organization_id=" not in url:
            query = {**params, "organization_id": self.config.zoho.organization_id}
        elif not params:
            query = None  # an image URL we built with its query: nothing for yarl to merge
        attempts = 0
        throttled = 0
        refreshed = False
        # After a 401, one request (the prober) refreshes and retries; the others that got a
        # 401 on the same token wait for its answer instead of each retrying: a missing
        # scope then costs the requests in flight plus one, not twice the concurrency.
        probing: asyncio.Future[bool] | None = None
        probe_key: tuple[str, str] | None = None
        waiting: asyncio.Future[bool] | None = None
        try:
            while True:
                if waiting is not None:
                    helped = await asyncio.shield(waiting)
                    waiting = None
                    if not helped:
                        self._raise_refused(endpoint)
                token = await self.tokens.token()
                if self._refused and self._is_refused(endpoint, token):
                    self._raise_refused(endpoint)
                headers = self._headers(token)
                try:
                    async with self.gate.request() as arrived:
                        self.requests_sent += 1
                        async with self.session.get(
                            url,
                            params=query,
                            headers=headers,
                            timeout=self._timeout(),
                            allow_redirects=False,
                        ) as resp:
                            arrived()
                            self._count(endpoint, resp.status)
                            if resp.status == 401:
                                detail = await _error_text(resp)
                                if self._is_refused(endpoint, token):
                                    self._raise_refused(endpoint)  # sent before it was known
                                if refreshed:
                                    # A freshly minted token refused too: scope, not expiry.
                                    self._refuse(endpoint, token, detail)
                                    if probing is not None:
                                        probing.set_result(False)
                                    self._raise_refused(endpoint)
                                other = self._probes.get((endpoint, token))
                                if other is not None:
                                    waiting = other
                                    continue
                                probe_key = (endpoint, token)
                                probing = asyncio.get_running_loop().create_future()
                                self._probes[probe_key] = probing
                                refreshed = True
                                # Never hand this token out again, even if the refresh fails.
                                self.tokens.invalidate(token)
                                await self.tokens.refresh(stale=token)
                                continue
                            if probing is not None and not probing.done():
                                probing.set_result(True)
                            if resp.status == 429:
                                await self._on_429(resp, endpoint)
                            if resp.status >= 500:
                                raise TransientError(f"HTTP {resp.status} from {endpoint}")
                            return await handle(resp)
                except RetryLater as exc:
                    throttled += 1
                    if throttled > MAX_429_RETRIES:
                        raise ItemError("retries_exhausted", f"still rate-limited: {exc}") from None
                    self.metrics.retries.labels(f"rate_limited_{exc.code}").inc()
                    # Every retry is an arrival Zoho counts: never hammer, even on Retry-After: 0.
                    await asyncio.sleep(max(exc.after, min(float(throttled), 30.0)))
                    continue
                except (BudgetExhausted, ItemError, FatalPassError, TokenUnavailable):
                    # A token we cannot get is the pass's problem, not this request's to retry.
                    raise
                except aiohttp.InvalidURL as exc:
                    raise ItemError("bad_url", f"unusable URL: {exc}") from None
                except (TransientError, aiohttp.ClientError, TimeoutError) as exc:
                    attempts += 1
                    await self._retry_or_give_up(exc, attempts, sink, endpoint)
        finally:
            if probing is not None and not probing.done():
                # Undecided (the refresh failed, a stop): let the waiters try for themselves.
                probing.set_result(True)
            if probe_key is not None:
                self._probes.pop(probe_key, None)

    def _refuse(self, endpoint: str, token: str, detail: str) -> None:
        """Remember that ``token`` is refused on ``endpoint`` even fresh: a missing scope."""
        msg = (
            f"Zoho refuses a freshly minted token on {endpoint} "
            f"({detail}): grant the scope ZohoInventory.items.READ"
        )
        if endpoint == "image" and self.config.zoho.image_endpoint == "inventory":
            msg += " or set zoho.image_endpoint = 'books'"
        self._refused[endpoint] = (token, msg)

    def _is_refused(self, endpoint: str, token: str) -> bool:
        refused = self._refused.get(endpoint)
        return refused is not None and refused[0] == token

    def _raise_refused(self, endpoint: str) -> NoReturn:
        refused = self._refused.get(endpoint)
        msg = refused[1] if refused else f"Zoho refuses the token on {endpoint}"
        if endpoint == "image":
            raise ItemError("forbidden", msg)
        raise ScopeError(msg)

    async def _on_429(self, resp: aiohttp.ClientResponse, endpoint: str) -> None:
        self.metrics.rate_limited.labels(endpoint).inc()
        body = await _json_or_none(resp)
        code = body.get("code") if isinstance(body, dict) else None
        if code == 45:
            resume = self.gate.budget.exhaust()
            raise BudgetExhausted("Zoho says the daily API budget is spent (code 45)", resume)
        after = _retry_after(resp)
        if after is None:
            after = 5.0 if code == 1070 else 15.0
        if code != 1070:
            # A per-minute 429 means our window is out of step with Zoho's: pause it all.
            self.gate.window.block_for(after)
        log.warning("rate limited by Zoho", endpoint=endpoint, code=code, retry_after=after)
        raise RetryLater(f"HTTP 429 code {code}", after=after, code=code)

    # -- images --------------------------------------------------------------

    async def _read_image(self, resp: aiohttp.ClientResponse, sink: ImageSink) -> ImageResult:
        status = resp.status
        if status in (404, 400, 410):
            detail = await _error_text(resp)
            raise ItemError("image_not_found", f"HTTP {status}: {detail}")
        if status == 403:
            raise ItemError("forbidden", f"HTTP 403: {await _error_text(resp)}")
        if 300 <= status < 400:
            raise ItemError("bad_url", f"unexpected redirect (HTTP {status}) from Zoho")
        if status != 200:
            raise TransientError(f"HTTP {status} for image")
        return await self._stream_body(resp, sink)

    async def _stream_body(self, resp: aiohttp.ClientResponse, sink: ImageSink) -> ImageResult:
        limit = self.config.download.max_image_bytes
        length = resp.content_length
        if length is not None and length > limit:
            raise ItemError("too_large", f"Content-Length {length} > max_image_bytes {limit}")
        encoding = resp.headers.get("Content-Encoding")
        identity = encoding is None or encoding.strip().lower() == "identity"
        if length is not None and 0 < length <= sink.spill_bytes and identity:
            # The common case (a 30-300 KB image with a Content-Length): one read, no
            # per-chunk loop. aiohttp stops at Content-Length and raises on a short body.
            # Not for a compressed body: Content-Length is then the packed size, and only
            # the chunked loop below caps what it unpacks to (a gzip bomb stops at the cap).
            body = await resp.read()
            if len(body) != length:
                raise aiohttp.ClientPayloadError(f"{len(body)} of {length} bytes")
            ext = sniff_image(body[:MAGIC_PREFIX_BYTES])
            if ext is None:
                raise _not_an_image(body[:4096], resp)
            sink.take(body)
            return ImageResult(ext)
        checked = False
        async for chunk in resp.content.iter_chunked(CHUNK):
            if sink.size + len(chunk) > limit:
                raise ItemError("too_large", f"body exceeds max_image_bytes {limit}")
            if not checked and sink.size + len(chunk) >= MAGIC_PREFIX_BYTES:
                checked = True
                head = sink.head + chunk[:MAGIC_PREFIX_BYTES]
                if sniff_image(head) is None:
                    # The bytes decide, never the Content-Type; a JSON or HTML body is an
                    # error page, maybe Zoho's "Attachment not found".
                    raise _not_an_image(head + chunk[MAGIC_PREFIX_BYTES:4096], resp)
            await sink.write(chunk)
        if sink.size == 0:
            raise ItemError("empty_body", "HTTP 200 with an empty body")
        ext = sniff_image(sink.head)
        if ext is None:
            raise _not_an_image(sink.head, resp)
        return ImageResult(ext)

    async def _external_image(self, url: str, sink: ImageSink) -> ImageResult:
        attempts = 0
        while True:
            try:
                return await self._external_once(url, sink)
            except (aiohttp.InvalidURL, ValueError) as exc:
                raise ItemError("bad_url", f"unusable URL: {exc}") from None
            except (TransientError, aiohttp.ClientError, TimeoutError) as exc:
                attempts += 1
                await self._retry_or_give_up(exc, attempts, sink, "external")

    async def _retry_or_give_up(
        self, exc: BaseException, attempts: int, sink: ImageSink | None, endpoint: str
    ) -> None:
        """After a transient failure: raise retries_exhausted at max_attempts, else back off."""
        reason = _transient_reason(exc)
        detail = str(exc) if isinstance(exc, TransientError) else reason
        if sink is not None:
            await sink.discard()
            sink.reset()
        if attempts >= self.config.download.max_attempts:
            raise ItemError("retries_exhausted", f"{attempts} attempts, last: {detail}")
        self.metrics.retries.labels(reason).inc()
        log.debug("retrying", endpoint=endpoint, attempt=attempts, error=detail)
        floor = exc.after if isinstance(exc, RetryLater) else 0.0
        await asyncio.sleep(max(floor, backoff_delay(attempts)))

    async def _external_once(self, url: str, sink: ImageSink) -> ImageResult:
        current = url
        # Cookies live for this one fetch (a redirect chain), never across items.
        jar = aiohttp.CookieJar(unsafe=True)
        for _ in range(MAX_REDIRECTS + 1):
            if urlsplit(current).scheme not in ("http", "https"):
                raise ItemError("bad_url", f"only http and https are fetched: {current[:200]}")
            async with (
                self.hosts.request(current),
                self.session.get(
                    current,
                    timeout=self._timeout(),
                    allow_redirects=False,
                    cookies=jar.filter_cookies(yarl.URL(current)) or None,
                ) as resp,
            ):
                jar.update_cookies(resp.cookies, resp.url)
                self.metrics.external_requests.labels(str(resp.status)).inc()
                if resp.status in (301, 302, 303, 307, 308):
                    location = resp.headers.get("Location")
                    if not location:
                        raise ItemError("bad_url", f"HTTP {resp.status} without Location")
                    current = urljoin(current, location)
                    continue
                if resp.status == 429:
                    after = _retry_after(resp) or 5.0
                    raise RetryLater(f"HTTP 429 from {urlsplit(current).netloc}", after)
                if resp.status in (404, 410):
                    raise ItemError("image_not_found", f"HTTP {resp.status} from {current}")
                if resp.status in (401, 403):
                    raise ItemError("forbidden", f"HTTP {resp.status} from {current}")
                if resp.status != 200:
                    raise TransientError(f"HTTP {resp.status} from {current}")
                return await self._stream_body(resp, sink)
        raise ItemError("bad_url", f"more than {MAX_REDIRECTS} redirects from {url[:200]}")


def _not_an_image(head: bytes, resp: aiohttp.ClientResponse) -> ItemError:
    ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
    text = head[:4096].decode("utf-8", "replace")
    if "attachment not found" in text.lower():
        return ItemError("image_not_found", f"HTTP 200 ({ctype}): {text[:200]}")
    return ItemError("not_an_image", f"HTTP 200 ({ctype or 'no type'}): {text[:80]!r}")


def _transient_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "truncated_body"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "dns_failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect_failed"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return "connection_reset"
    if isinstance(exc, TransientError) and "HTTP 5" in str(exc):
        return "server_error"
    return "transient"


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    for header in ("Retry-After", "X-Rate-Limit-Reset"):
        value = resp.headers.get(header)
        if value:
            try:
                return min(max(float(value), 0.0), 3600.0)
            except ValueError:
                continue
    return None


async def _json_or_none(resp: aiohttp.ClientResponse) -> Any:
    try:
        return json.loads(await resp.content.read(65536))
    except (ValueError, aiohttp.ClientError):
        return None


async def _error_text(resp: aiohttp.ClientResponse) -> str:
    body = await _json_or_none(resp)
    if isinstance(body, dict):
        return f"code {body.get('code')}: {body.get('message')}"
    return f"HTTP {resp.status}"
