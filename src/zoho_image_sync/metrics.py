"""Prometheus metrics, on a registry of our own (no global default registry)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .errors import REASONS
from .state import STATUSES

P = "zoho_image_sync_"
FLUSH_EVERY: Final = 1024


class _Flush(Collector):
    """A collector with no series of its own: collecting it flushes ``Metrics``."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        self._metrics.flush()
        return []


class Metrics:
    """Every series the contract names, plus what tells stuck, throttled or losing apart."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        # Per-image figures are kept as plain numbers and moved into their series when
        # scraped (or every FLUSH_EVERY images): a Counter.inc or Histogram.observe takes
        # a lock and several calls, three of them per image showed in the profile. The
        # flusher is registered first, so a scrape sees every image written before it.
        self._written_bytes = 0
        self._durations: list[float] = []  # one per image written since the last flush
        r.register(_Flush(self))
        self.images_downloaded = Counter(
            P + "images_downloaded", "Images written to disk (new or updated).", registry=r
        )
        self.bytes_downloaded = Counter(
            P + "bytes_downloaded", "Bytes of images written to disk.", registry=r
        )
        self.image_failures = Counter(
            P + "image_failures",
            "Items whose image failed in a pass, by reason.",
            ["reason"],
            registry=r,
        )
        self.api_requests = Counter(
            P + "api_requests",
            "Requests sent to Zoho (token, items pages, images), by HTTP status code.",
            ["endpoint", "code"],
            registry=r,
        )
        self.rate_limited = Counter(
            P + "rate_limited", "HTTP 429 answers from Zoho, by endpoint.", ["endpoint"], registry=r
        )
        self.token_refreshes = Counter(
            P + "token_refreshes",
            "Access token refresh attempts, by result.",
            ["result"],
            registry=r,
        )
        self.retries = Counter(P + "retries", "Requests retried, by cause.", ["reason"], registry=r)
        self.external_requests = Counter(
            P + "external_requests",
            "Requests to non-Zoho image hosts (url_map, image_url), by HTTP status code.",
            ["code"],
            registry=r,
        )
        self.passes = Counter(
            P + "passes", "Sync passes finished, by status.", ["status"], registry=r
        )
        self.items = Gauge(P + "items", "Catalogue items by local state.", ["state"], registry=r)
        self.queue_depth = Gauge(
            P + "queue_depth", "Items waiting between the pager and the workers.", registry=r
        )
        self.downloads_in_flight = Gauge(
            P + "downloads_in_flight", "Image downloads in progress.", registry=r
        )
        self.workers = Gauge(P + "workers", "Download workers configured.", registry=r)
        self.daily_budget_remaining = Gauge(
            P + "daily_budget_remaining", "Zoho API requests left in today's budget.", registry=r
        )
        self.last_pass_success = Gauge(
            P + "last_pass_success_timestamp_seconds",
            "Unix time at which the last successful (or partial) pass ended.",
            registry=r,
        )
        self.last_pass_images = Gauge(
            P + "last_pass_images_downloaded", "Images downloaded by the last pass.", registry=r
        )
        self.pass_in_progress = Gauge(
            P + "pass_in_progress", "1 while a sync pass is running.", registry=r
        )
        self.pass_progress = Gauge(
            P + "pass_items_processed", "Catalogue items processed so far in this pass.", registry=r
        )
        self.token_expiry = Gauge(
            P + "token_expiry_timestamp_seconds",
            "Unix time at which the held access token expires (0: none held).",
            registry=r,
        )
        self.ready = Gauge(P + "ready", "1 when /readyz answers 200.", registry=r)
        self.pass_duration = Histogram(
            P + "pass_duration_seconds",
            "Wall time of a sync pass.",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800),
            registry=r,
        )
        self.download_duration = Histogram(
            P + "download_duration_seconds",
            "Time to fetch and write one image, retries included.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.config_reload_ok = Gauge(
            P + "config_last_reload_successful",
            "1 if the last configuration reload succeeded.",
            registry=r,
        )
        self.config_reload_ok.set(1)
        # Read at scrape time from the running pass (0 between passes), not pushed per
        # image (each Gauge.set takes a lock).
        self.in_flight: Callable[[], int] = int
        self.queue_length: Callable[[], int] = int
        self.downloads_in_flight.set_function(lambda: self.in_flight())
        self.queue_depth.set_function(lambda: self.queue_length())
        for reason in REASONS:
            self.image_failures.labels(reason)
        for status in STATUSES:
            self.items.labels(status)
        for endpoint in ("token", "items", "image"):
            self.rate_limited.labels(endpoint)
        for result in ("success", "error", "throttled", "unreachable"):
            self.token_refreshes.labels(result)

    def image_written(self, seconds: float, size: int) -> None:
        """One image is on disk: images_downloaded, bytes_downloaded, download_duration."""
        self._written_bytes += size
        self._durations.append(seconds)
        if len(self._durations) >= FLUSH_EVERY:  # bounded, even with nobody scraping
            self.flush()

    def flush(self) -> None:
        """Move the per-image figures kept since the last flush into their series.

        Called on the event loop's thread only (the /metrics handler runs there), as is
        ``image_written``: the plain numbers need no lock.
        """
        durations, self._durations = self._durations, []
        if durations:
            self.images_downloaded.inc(len(durations))
        if self._written_bytes:
            size, self._written_bytes = self._written_bytes, 0
            self.bytes_downloaded.inc(size)
        for seconds in durations:
            self.download_duration.observe(seconds)

    def set_item_counts(self, counts: dict[str, int]) -> None:
        """Mirror the state's per-status counts."""
        for status, n in counts.items():
            self.items.labels(status).set(n)

    def exposition(self) -> bytes:
        """The text format for /metrics."""
        return generate_latest(self.registry)
