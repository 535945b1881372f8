"""HTTP for every connector, written once: rate limiting, retries, pagination, error mapping.

- `RateLimiter`: one per credential. A token bucket for published rates, a cap on requests in
  flight, and feedback from rate-limit headers and 429s (a pause shared by every request of the
  credential, so a 429 never turns into a retry storm).
- `ApiClient`: an `httpx.AsyncClient` with bounded retries (exponential backoff with full jitter,
  honouring `Retry-After` and the ERP's reset header) and mapping of failures to `erp_pipelines.errors`.
  JSON numbers are decoded as `Decimal`, so money never passes through float.
- Pagination for offset (`from`/`count`) and page-number styles, over any page fetcher.

Messages never include request headers or bodies, so credentials cannot leak through errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import json
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any

import httpx

from erp_pipelines.errors import BadResponse, ErpError, RateLimited, UpstreamError

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclasses.dataclass
class RequestStats:
    """What a client did; shared figures for benchmarks, chaos runs and materialisation metadata."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    transport_errors: int = 0
    by_status: Counter = dataclasses.field(default_factory=Counter)
    throttled_seconds: float = 0.0

    def as_metadata(self) -> dict[str, int | float]:
        return {
            "http_requests": self.requests,
            "http_retries": self.retries,
            "http_429s": self.rate_limited,
            "http_transport_errors": self.transport_errors,
            "throttled_seconds": round(self.throttled_seconds, 3),
        }


@dataclasses.dataclass(frozen=True)
class RateLimitHeaders:
    """Names of an ERP's rate-limit headers. `reset_is_delta`: seconds left, else an epoch time."""

    limit: str | None = None
    remaining: str | None = None
    reset: str | None = None
    reset_is_delta: bool = True


class RateLimiter:
    """Rate and concurrency limit for one credential, shared by all its requests in a process.

    `requests_per_second=None` means the ERP publishes no number: follow its headers instead (when
    `remaining` reaches the requests already in flight, wait for the window to reset).
    """

    def __init__(
        self,
        requests_per_second: float | None = None,
        max_in_flight: int = 8,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.requests_per_second = requests_per_second
        self.max_in_flight = max_in_flight
        self._clock = clock
        self._in_flight = asyncio.Semaphore(max_in_flight) if max_in_flight else None
        self._bucket_capacity = max(1.0, requests_per_second or 1.0)
        self._tokens = self._bucket_capacity
        self._refilled_at = clock()
        self._paused_until = 0.0
        self._last_reset_seconds: float | None = None
        self._consecutive_429s = 0
        self._lock = asyncio.Lock()
        self.waited_seconds = 0.0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._in_flight is None:
            await self._wait_turn()
            yield
            return
        async with self._in_flight:
            await self._wait_turn()
            yield

    async def _wait_turn(self) -> None:
        while True:
            async with self._lock:
                now = self._clock()
                delay = self._paused_until - now
                if delay <= 0 and self.requests_per_second:
                    elapsed = now - self._refilled_at
                    self._tokens = min(self._bucket_capacity, self._tokens + elapsed * self.requests_per_second)
                    self._refilled_at = now
                    if self._tokens >= 1:
                        self._tokens -= 1
                        return
                    delay = (1 - self._tokens) / self.requests_per_second
                elif delay <= 0:
                    return
            self.waited_seconds += delay
            await asyncio.sleep(delay)

    def observe_headers(self, headers: Mapping[str, str], names: RateLimitHeaders | None) -> None:
        """Pause before the window is exhausted, from the ERP's remaining/reset headers."""
        self._consecutive_429s = 0
        if names is None or names.remaining is None:
            return
        remaining = _as_float(headers.get(names.remaining))
        reset = self._reset_seconds(headers, names)
        if reset is not None:
            self._last_reset_seconds = reset
        if remaining is None or reset is None:
            return
        in_flight = self.max_in_flight - (self._in_flight._value if self._in_flight else 0)
        if remaining <= max(0, in_flight - 1):
            self._pause(reset)

    def on_rate_limited(self, headers: Mapping[str, str], names: RateLimitHeaders | None) -> float:
        """A 429: pause every request of this credential; returns the pause in seconds.

        Order: `Retry-After`, the ERP's reset header, the last reset seen, then exponential backoff
        (ERPs such as Tripletex send 429 without any reset header)."""
        self._consecutive_429s += 1
        delay = _retry_after_seconds(headers.get("retry-after"))
        if delay is None and names is not None:
            delay = self._reset_seconds(headers, names)
        if delay is None and self._last_reset_seconds is not None and self._consecutive_429s == 1:
            delay = self._last_reset_seconds
        if delay is None:
            delay = min(60.0, 0.5 * 2 ** (self._consecutive_429s - 1))
        delay = max(0.05, delay) * random.uniform(1.0, 1.2)
        self._pause(delay)
        return delay

    def _pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    def _reset_seconds(self, headers: Mapping[str, str], names: RateLimitHeaders) -> float | None:
        if names.reset is None:
            return None
        value = _as_float(headers.get(names.reset))
        if value is None:
            return None
        return value if names.reset_is_delta else max(0.0, value - time.time())


def _as_float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    seconds = _as_float(value)
    if seconds is not None:
        return max(0.0, seconds)
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    return None


def decode_json(response: httpx.Response) -> Any:
    """The body as JSON with exact Decimal numbers."""
    return json.loads(response.content, parse_float=Decimal)


ErrorMapper = Callable[[httpx.Response, Any], ErpError | None]


@dataclasses.dataclass
class RetryPolicy:
    max_attempts: int = 5
    backoff_base: float = 0.25
    backoff_cap: float = 20.0

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
        return random.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))


class ApiClient:
    """One ERP credential's HTTP client. Connectors call `get_json`/`send_json` and the paginators."""

    def __init__(
        self,
        *,
        erp: str,
        base_url: str,
        limiter: RateLimiter,
        rate_limit_headers: RateLimitHeaders | None = None,
        map_error: ErrorMapper | None = None,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 60.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.erp = erp
        self.limiter = limiter
        self.rate_limit_headers = rate_limit_headers
        self.map_error = map_error
        self.retry = retry or RetryPolicy()
        self.stats = RequestStats()
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            headers={"Accept": "application/json", **(headers or {})},
            limits=httpx.Limits(max_connections=max(limiter.max_in_flight, 1) * 2, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        auth: httpx.Auth | None = None,
        tenant: str | None = None,
    ) -> httpx.Response:
        """Send with retries; returns a 2xx response or raises a mapped `ErpError`."""
        url = path.lstrip("/")
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self.limiter.slot():
                    self.stats.requests += 1
                    response = await self._http.request(method, url, params=params, json=json_body, auth=auth)
            except httpx.TransportError as exc:
                self.stats.transport_errors += 1
                if attempt >= self.retry.max_attempts:
                    raise UpstreamError(
                        f"{method} {path} failed after {attempt} attempts: {type(exc).__name__}",
                        erp=self.erp,
                        tenant=tenant,
                        fix="the ERP did not answer; retry the partition later",
                    ) from None
                await self._sleep_before_retry(attempt)
                continue
            self.stats.by_status[response.status_code] += 1
            if response.status_code == 429:
                self.stats.rate_limited += 1
                pause = self.limiter.on_rate_limited(response.headers, self.rate_limit_headers)
                if attempt >= self.retry.max_attempts:
                    raise RateLimited(
                        f"{method} {path} still rate limited after {attempt} attempts",
                        erp=self.erp,
                        tenant=tenant,
                        fix="lower the concurrency for this credential or retry later",
                    )
                log.debug("%s %s: 429, pausing %.2fs", method, path, pause)
                self.stats.retries += 1
                continue
            self.limiter.observe_headers(response.headers, self.rate_limit_headers)
            if response.is_success:
                return response
            body = _safe_json(response)
            mapped = self.map_error(response, body) if self.map_error else None
            if mapped is None and response.status_code in RETRY_STATUSES:
                if attempt < self.retry.max_attempts:
                    await self._sleep_before_retry(attempt)
                    continue
                mapped = UpstreamError(
                    f"{method} {path} answered HTTP {response.status_code} after {attempt} attempts",
                    erp=self.erp,
                    fix="the ERP is failing; retry the partition later",
                )
            if mapped is None:
                mapped = BadResponse(f"{method} {path} answered HTTP {response.status_code}", erp=self.erp)
            raise mapped.for_tenant(tenant) if tenant else mapped

    async def get_json(self, path: str, *, params=None, auth=None, tenant: str | None = None) -> Any:
        return await self._json("GET", path, params=params, auth=auth, tenant=tenant)

    async def send_json(self, method: str, path: str, body: Any, *, params=None, auth=None, tenant=None) -> Any:
        return await self._json(method, path, params=params, json_body=body, auth=auth, tenant=tenant)

    async def _json(self, method: str, path: str, *, tenant: str | None, **kwargs) -> Any:
        """Like `request`, plus JSON decoding; a truncated or malformed body is retried like a
        dropped connection (it usually is one), then raised as `BadResponse`."""
        for attempt in range(1, self.retry.max_attempts + 1):
            response = await self.request(method, path, tenant=tenant, **kwargs)
            try:
                return decode_json(response)
            except ValueError:
                if attempt == self.retry.max_attempts:
                    raise BadResponse(
                        f"{method} {path} returned malformed JSON {attempt} times",
                        erp=self.erp,
                        tenant=tenant,
                        fix="the ERP returned a broken payload; retry the partition later",
                    ) from None
                await self._sleep_before_retry(attempt)
        raise AssertionError("unreachable")

    async def _sleep_before_retry(self, attempt: int) -> None:
        self.stats.retries += 1
        await asyncio.sleep(self.retry.backoff(attempt))


PageFetcher = Callable[[dict[str, Any]], Awaitable[Any]]


async def offset_pages(
    fetch_page: PageFetcher,
    params: Mapping[str, Any] | None = None,
    *,
    page_size: int,
    items_key: str = "values",
    offset_param: str = "from",
    size_param: str = "count",
    where: str = "",
) -> AsyncIterator[list[Any]]:
    """Offset paging (`from`/`count` style). Stops on a short page, never on a reported total
    (Tripletex's `fullResultSize` is inexact, its NOTES §4)."""
    offset = 0
    while True:
        items = _items(await fetch_page({**(params or {}), offset_param: offset, size_param: page_size}), items_key, where)
        yield items
        if len(items) < page_size:
            return
        offset += len(items)


async def numbered_pages(
    fetch_page: PageFetcher,
    params: Mapping[str, Any] | None = None,
    *,
    page_size: int,
    items_key: str | None = None,
    page_param: str = "page",
    size_param: str = "pageSize",
    first_page: int = 0,
    where: str = "",
) -> AsyncIterator[list[Any]]:
    """Page-number paging (`page`/`pageSize` style); stops on a short page."""
    page = first_page
    while True:
        body = await fetch_page({**(params or {}), page_param: page, size_param: page_size})
        items = body if items_key is None else _items(body, items_key, where)
        yield items
        if len(items) < page_size:
            return
        page += 1


async def collect(pages: AsyncIterator[list[Any]]) -> list[Any]:
    return [item async for page in pages for item in page]


def _items(body: Any, key: str, where: str) -> list[Any]:
    items = body.get(key) if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise BadResponse(f"{where}: response has no '{key}' list")
    return items


def _safe_json(response: httpx.Response) -> Any:
    try:
        return decode_json(response)
    except ValueError:
        return None
