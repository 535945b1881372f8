"""HTTP for every connector, written once: rate limiting, retries, pagination, error mapping.

- `RateLimiter`: one per credential. A token bucket for published rates, a cap on requests in
  flight, and feedback from rate-limit headers and 429s (a pause shared by every request of the
  credential, so a 429 never turns into a retry storm).
- `ApiClient`: an `httpx.AsyncClient` with bounded retries (exponential backoff with full jitter,
  honouring `Retry-After` and the ERP's reset header) and mapping of failures to `erp_pipelines.errors`.
  JSON numbers are decoded as `Decimal`, so money never passes through float.
- `ShardedTransport`: the connection pool split into small pools, so a credential with 60 requests
  in flight does not pay httpcore's per-request walk over every connection.
- `consistent_offset_list`: an offset-paged (`from`/`count`) list read as one consistent snapshot,
  over any page fetcher.

Messages never include request headers or bodies, so credentials cannot leak through errors.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import email.utils
import importlib.util
import json
import logging
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx

from erp_pipelines.errors import BadResponse, ErpError, RateLimited, UpstreamError

if TYPE_CHECKING:
    from erp_pipelines.erps.base import RateLimit

log = logging.getLogger(__name__)


def _record_sniffio_absent() -> None:
    """httpcore 1.x runs `import sniffio` on every request to tell asyncio from trio. anyio 4.x no
    longer installs sniffio, and Python does not cache a failed import: each request then scans
    sys.path several times (~0.25 ms each, about a third of the client's CPU per request at the
    rate limit). Recording the module as absent makes the failed import instant; the answer
    httpcore gets ("asyncio") is the same."""
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # `import sniffio` now raises ImportError at once


_record_sniffio_absent()

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


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

    Three kinds of limit, combined:

    - a published rate (`requests_per_second`): a token bucket holding one second's worth;
    - requests in flight: at most `in_flight_limit`, which starts at `max_in_flight`. When the ERP
      publishes no concurrency cap (`in_flight_ceiling` above `max_in_flight`), the limit follows
      Little's law as latency dominates: enough requests in flight to reach the allowed rate at the
      server's latency (the lowest of the last 100 response times; rate × latency × 1.5 + 1),
      never above the ceiling;
    - the ERP's rate-limit headers (limit / remaining / reset), for ERPs that publish no number
      (`requests_per_second=None`: Tripletex, Visma.net). The limiter models the current window:
      its credits (remaining, minus the requests sent after the one that reported it, so requests
      in flight are never counted twice) and when it ends. It sends while credits last, then waits
      for the window's end and starts the next one at full speed. The end is known within one
      round trip when the window's first request is known (its send time + the window length, the
      longest reset seen); otherwise `response time + reset` bounds it. A reset header in whole
      seconds alone would waste up to a second per window.

    A 429 pauses every request of the credential, so it never turns into a retry storm: for
    `Retry-After`, else the ERP's reset header, else until the modelled window end (Tripletex's 429
    has no reset header). A 429 after the modelled end means the guess was early: the limiter
    then probes with a short backoff (1/50 of the window, doubling, never past the window's upper
    bound). Without any model: the last reset seen, then 0.5 s doubling (with jitter, at most 60 s).
    429s of requests sent before the pause began belong to the same incident and do not escalate.

    `clock` and `sleep` are injectable, so tests run on a fake clock.
    """

    WINDOW_END_MARGIN = 0.005  # seconds after the modelled window end before its next request
    _SENT_HISTORY = 4096  # send times kept to find a window's first request

    def __init__(
        self,
        requests_per_second: float | None = None,
        max_in_flight: int | None = 8,
        *,
        in_flight_ceiling: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.requests_per_second = requests_per_second
        self.max_in_flight = max_in_flight or 0  # 0: unbounded
        self.in_flight_ceiling = max(in_flight_ceiling or 0, self.max_in_flight) if self.max_in_flight else 0
        self.in_flight_limit = self.max_in_flight
        self.in_flight = 0
        self.peak_in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._clock = clock
        self._sleep = sleep
        # token bucket (published rate)
        self._bucket_capacity = max(1.0, requests_per_second or 1.0)
        self._tokens = self._bucket_capacity
        self._refilled_at = clock()
        # window model (rate-limit headers)
        self.window_limit: int | None = None  # the header's limit per window
        self.window_seconds: float | None = None  # the longest reset seen: the window's length
        self._credits: float | None = None  # requests we may still send in this window; None: unknown
        self._window_lo: float | None = None  # the window ends after this ...
        self._window_hi: float | None = None  # ... and no later than this
        self._resume_at: float | None = None  # when to send again once the credits are spent
        self._assumed_fresh = False  # credits were refilled on the model's word, not the server's
        self._early_guesses = 0
        self._observed_seq = 0
        self._observed_remaining: float | None = None
        self._seq = 0
        self._sent_at: collections.deque[float] = collections.deque(maxlen=self._SENT_HISTORY)
        # the server's latency: the lowest of the recent response times (a mean would also count our
        # own event loop's delays, and more requests in flight cannot cure those)
        self.latency: float | None = None
        self._latencies: collections.deque[float] = collections.deque(maxlen=100)
        # 429s
        self._paused_until = 0.0
        self._incident_at = float("-inf")
        self._last_reset_seconds: float | None = None
        self._consecutive_429s = 0
        self.waited_seconds = 0.0

    @classmethod
    def for_rate_limit(cls, limit: RateLimit, **kwargs: Any) -> RateLimiter:
        """The limiter for an ERP's published limit (`Connector.rate_limit`)."""
        return cls(limit.requests_per_second, limit.max_in_flight, in_flight_ceiling=limit.in_flight_ceiling, **kwargs)

    # ------------------------------------------------------------------------------ slots

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one request's turn: in flight, within the rate, within the window's credits."""
        await self._acquire()
        ticket: _Ticket | None = None
        try:
            ticket = await self._wait_turn()
            _TICKET.set(ticket)
            yield
        finally:
            if ticket is not None:
                ticket.done = self._clock()
            self._release()

    async def _acquire(self) -> None:
        if self.in_flight_limit and (self.in_flight >= self.in_flight_limit or self._waiters):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter  # `_wake` counts us in before it resolves the future
                return
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release()
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                raise
        self._enter()

    def _enter(self) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and (not self.in_flight_limit or self.in_flight < self.in_flight_limit):
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._enter()
                waiter.set_result(None)

    async def _wait_turn(self) -> _Ticket:
        while True:
            now = self._clock()
            delay = self._delay(now)
            if delay <= 0:
                return self._take(now)
            self.waited_seconds += delay
            await self._sleep(delay)

    def _delay(self, now: float) -> float:
        """Seconds until the next request may go (0: now)."""
        if self._paused_until > now:
            return self._paused_until - now
        if self._credits is not None and self._credits < 1:
            if self._resume_at is not None and now < self._resume_at:
                return self._resume_at - now
            # the spent window has ended: a fresh one, as the next response will confirm
            self._credits = float(self.window_limit) if self.window_limit else None
            self._assumed_fresh = True
        if self.requests_per_second:
            self._tokens = min(self._bucket_capacity,
                               self._tokens + (now - self._refilled_at) * self.requests_per_second)
            self._refilled_at = now
            if self._tokens < 1:
                return (1 - self._tokens) / self.requests_per_second
        return 0.0

    def _take(self, now: float) -> _Ticket:
        self._seq += 1
        self._sent_at.append(now)
        if self._credits is not None:
            self._credits -= 1
        if self.requests_per_second:
            self._tokens -= 1
        return _Ticket(self._seq, now)

    def _sent_time(self, seq: int) -> float | None:
        index = seq - (self._seq - len(self._sent_at) + 1)
        return self._sent_at[index] if 0 <= index < len(self._sent_at) else None

    def allowed_rate(self) -> float | None:
        """Requests per second the ERP allows: the published rate and/or the headers' limit per window."""
        rates = [self.requests_per_second or 0.0]
        if self.window_limit and self.window_seconds:
            rates.append(self.window_limit / self.window_seconds)
        rates = [rate for rate in rates if rate > 0]
        return min(rates) if rates else None

    def _observe_latency(self, seconds: float) -> None:
        self._latencies.append(seconds)
        self.latency = min(self._latencies)
        rate = self.allowed_rate()
        if not rate or self.in_flight_ceiling <= self.max_in_flight:
            return
        wanted = math.ceil(rate * self.latency * 1.5) + 1
        limit = min(self.in_flight_ceiling, max(self.max_in_flight, wanted))
        if limit != self.in_flight_limit:
            self.in_flight_limit = limit
            self._wake()

    # ------------------------------------------------------------------------------ feedback

    def observe_headers(self, headers: Mapping[str, str], names: RateLimitHeaders | None) -> None:
        """A response other than 429: its latency, and its rate-limit headers update the window model."""
        self._consecutive_429s = 0
        now = self._clock()
        ticket = _TICKET.get() or _Ticket(self._seq, now, now)
        done = ticket.done if ticket.done is not None else now
        self._observe_latency(done - ticket.sent)
        if names is None or names.remaining is None:
            return
        limit = _as_float(headers.get(names.limit)) if names.limit else None
        remaining = _as_float(headers.get(names.remaining))
        reset = self._reset_seconds(headers, names)
        if limit is not None and limit >= 1:
            self.window_limit = int(limit)
        if reset is not None:
            self._last_reset_seconds = reset
            self.window_seconds = max(self.window_seconds or 0.0, reset)
        if remaining is None or reset is None or ticket.seq < self._observed_seq:
            return  # nothing to model, or older news than we have
        # within one window `remaining` falls in send order; not falling means another window
        if self._observed_remaining is None or remaining >= self._observed_remaining:
            self._start_window(ticket, remaining, done + reset)
        elif self._assumed_fresh:
            # the window we took for ended still runs: the guess was early
            self._assumed_fresh = False
            self._window_lo = max(self._window_lo or ticket.sent, ticket.sent)
            self._window_hi = min(self._window_hi or done + reset, done + reset)
            self._resume_at = self._probe_at(now)
        else:
            self._window_hi = min(self._window_hi or done + reset, done + reset)
            if self._resume_at is not None:
                self._resume_at = min(self._resume_at, self._window_hi)
        self._observed_seq, self._observed_remaining = ticket.seq, remaining
        self._credits = remaining - (self._seq - ticket.seq)

    def _start_window(self, ticket: _Ticket, remaining: float, upper: float) -> None:
        self._assumed_fresh = False
        self._early_guesses = 0
        self._window_lo, self._window_hi = None, upper
        if self.window_limit and self.window_seconds:
            first_seq = ticket.seq - int(self.window_limit - 1 - remaining)  # the window's first request
            first = self._sent_time(first_seq) if first_seq > self._observed_seq else None
            if first is not None:
                done = ticket.done if ticket.done is not None else upper
                self._window_lo = first + self.window_seconds
                self._window_hi = min(upper, done + self.window_seconds)
        self._resume_at = (
            self._window_lo + self.WINDOW_END_MARGIN if self._window_lo is not None else self._window_hi
        )

    def _probe_at(self, now: float) -> float:
        """After an early guess: try again a little later, never past the window's upper bound."""
        self._early_guesses += 1
        step = max(0.005, (self.window_seconds or 1.0) / 50) * 2 ** (self._early_guesses - 1)
        at = max(now, self._window_lo or now) + step
        return min(at, self._window_hi) if self._window_hi is not None and self._window_hi > now else at

    def on_rate_limited(self, headers: Mapping[str, str], names: RateLimitHeaders | None) -> float:
        """A 429: pause every request of this credential; returns the pause in seconds."""
        now = self._clock()
        ticket = _TICKET.get() or _Ticket(self._seq, now, now)
        if self._credits is not None:
            self._credits = 0.0  # the server says this window is spent
        delay = _retry_after_seconds(headers.get("retry-after"))
        if delay is None and names is not None:
            delay = self._reset_seconds(headers, names)
        if delay is None and ticket.sent <= self._incident_at:
            return max(0.0, self._paused_until - now)  # part of the incident already paused for
        self._consecutive_429s += 1
        if delay is None:
            self._incident_at = now
            delay = self._model_delay(now, ticket)
        if delay is None and self._last_reset_seconds is not None and self._consecutive_429s == 1:
            delay = self._last_reset_seconds
        if delay is None:
            delay = min(60.0, 0.5 * 2 ** (self._consecutive_429s - 1)) * random.uniform(1.0, 1.2)
        delay = max(0.0, delay)
        self._pause(delay)
        return delay

    def _model_delay(self, now: float, ticket: _Ticket) -> float | None:
        """How long the window model says to wait after a 429 without any reset header."""
        if self._window_hi is None:
            return None
        if not self._assumed_fresh and self._resume_at is not None and now < self._resume_at:
            return self._resume_at - now  # the window still runs, as modelled
        # the model took the window for ended too early: probe
        self._assumed_fresh = False
        self._window_lo = max(self._window_lo or ticket.sent, ticket.sent)
        self._resume_at = self._probe_at(now)
        return self._resume_at - now

    def _pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    def _reset_seconds(self, headers: Mapping[str, str], names: RateLimitHeaders) -> float | None:
        if names.reset is None:
            return None
        value = _as_float(headers.get(names.reset))
        if value is None:
            return None
        return value if names.reset_is_delta else max(0.0, value - time.time())


@dataclasses.dataclass
class _Ticket:
    """One request's turn: its number in send order, when it was sent and when it returned."""

    seq: int
    sent: float
    done: float | None = None


# The current request's ticket, read by `observe_headers`/`on_rate_limited` after the slot is left.
_TICKET: contextvars.ContextVar[_Ticket | None] = contextvars.ContextVar("rate_limit_ticket", default=None)


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


class ShardedTransport(httpx.AsyncBaseTransport):
    """httpx's connection pool, split into small pools (shards) of at most `per_shard` connections.

    httpcore's pool walks all its connections on every request and every response, probing each
    idle one's socket and counting idle connections once per idle connection. That is cheap for a
    handful of connections and not for the 60 a credential keeps in flight at 200 ms latency: about
    10 ms of CPU per request (measured, 64 connections), which then caps the rate. Each request
    goes to the shard with the fewest requests in flight, so every shard stays small."""

    PER_SHARD = 8

    def __init__(self, shards: int, per_shard: int = PER_SHARD) -> None:
        limits = httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard)
        self._pools = [httpx.AsyncHTTPTransport(limits=limits) for _ in range(max(1, shards))]
        self._busy = [0] * len(self._pools)

    @classmethod
    def for_limiter(cls, limiter: RateLimiter) -> ShardedTransport | None:
        """Room for twice the limiter's most requests in flight (unbounded: 64 connections). None
        when the environment names a proxy: httpx's own pool then applies it, as it always did."""
        if any(os.environ.get(name) for name in PROXY_VARIABLES):
            return None
        room = 2 * (limiter.in_flight_ceiling or 32)
        return cls(math.ceil(room / cls.PER_SHARD), min(cls.PER_SHARD, room))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        shard = min(range(len(self._pools)), key=self._busy.__getitem__)
        self._busy[shard] += 1
        released = False

        def release() -> None:  # when the body is read and closed: the connection is free again
            nonlocal released
            if not released:
                released = True
                self._busy[shard] -= 1

        try:
            response = await self._pools[shard].handle_async_request(request)
        except BaseException:
            release()
            raise
        return httpx.Response(response.status_code, headers=response.headers, extensions=response.extensions,
                              stream=_ReleasingStream(response.stream, release))

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


class _ReleasingStream(httpx.AsyncByteStream):
    def __init__(self, stream: Any, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._release()


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
            transport=transport or ShardedTransport.for_limiter(limiter),
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            headers={"Accept": "application/json", **(headers or {})},
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
        decode: bool = False,
        first_attempt: int = 1,
    ) -> Any:
        """Send with retries; returns a 2xx response (with `decode`: its JSON body) or raises a
        mapped `ErpError`. Every attempt counts against one budget (`RetryPolicy.max_attempts`),
        whatever went wrong: a 5xx, a 429, a dropped connection or a malformed body.

        `first_attempt`: a caller repeating a request after handling an error itself (a re-minted
        session after a 401) continues the budget instead of starting a new one; raised errors
        carry `attempts`, the attempts spent."""
        url = path.lstrip("/")
        attempt = max(1, first_attempt) - 1
        while True:
            attempt += 1
            try:
                queued_at = time.monotonic()
                async with self.limiter.slot():
                    self.stats.throttled_seconds += time.monotonic() - queued_at
                    self.stats.requests += 1
                    response = await self._http.request(method, url, params=params, json=json_body, auth=auth)
            except httpx.TransportError as exc:
                self.stats.transport_errors += 1
                await self._retry_or_give_up(
                    attempt, UpstreamError, f"{method} {path} failed after {attempt} attempts: {type(exc).__name__}",
                    "the ERP did not answer; retry the partition later", tenant,
                )
                continue
            self.stats.by_status[response.status_code] += 1
            if response.status_code == 429:
                self.stats.rate_limited += 1
                pause = self.limiter.on_rate_limited(response.headers, self.rate_limit_headers)
                log.debug("%s %s: 429, pausing %.2fs", method, path, pause)
                await self._retry_or_give_up(  # the limiter's pause is the back-off
                    attempt, RateLimited, f"{method} {path} still rate limited after {attempt} attempts",
                    "lower the concurrency for this credential or retry later", tenant, back_off=False,
                )
                continue
            self.limiter.observe_headers(response.headers, self.rate_limit_headers)
            if response.is_success and not decode:
                return response
            if response.is_success:
                try:
                    return decode_json(response)
                except ValueError:  # truncated or malformed: retried like a dropped connection
                    await self._retry_or_give_up(
                        attempt, BadResponse, f"{method} {path} returned malformed JSON {attempt} times",
                        "the ERP returned a broken payload; retry the partition later", tenant,
                    )
                    continue
            body = _safe_json(response)
            mapped = self.map_error(response, body) if self.map_error else None
            if mapped is None and response.status_code in RETRY_STATUSES:
                await self._retry_or_give_up(
                    attempt, UpstreamError, f"{method} {path} answered HTTP {response.status_code} after {attempt} attempts",
                    "the ERP is failing; retry the partition later", tenant,
                )
                continue
            if mapped is None:
                mapped = BadResponse(f"{method} {path} answered HTTP {response.status_code}", erp=self.erp)
            mapped.attempts = attempt
            raise mapped.for_tenant(tenant) if tenant else mapped

    async def _retry_or_give_up(
        self, attempt: int, error_class: type[ErpError], message: str, fix: str, tenant: str | None,
        *, back_off: bool = True,
    ) -> None:
        """Return when the attempt budget allows another try (after backing off); else raise."""
        if attempt >= self.retry.max_attempts:
            error = error_class(message, erp=self.erp, tenant=tenant, fix=fix)
            error.attempts = attempt
            raise error from None
        if back_off:
            await self._sleep_before_retry(attempt)
        else:
            self.stats.retries += 1

    async def get_json(self, path: str, *, params=None, auth=None, tenant: str | None = None,
                       first_attempt: int = 1) -> Any:
        return await self._json("GET", path, params=params, auth=auth, tenant=tenant, first_attempt=first_attempt)

    async def send_json(self, method: str, path: str, body: Any, *, params=None, auth=None, tenant=None) -> Any:
        return await self._json(method, path, params=params, json_body=body, auth=auth, tenant=tenant)

    async def _json(self, method: str, path: str, *, tenant: str | None, **kwargs) -> Any:
        """`request` with JSON decoding; a truncated or malformed body is retried like a dropped
        connection (it usually is one), within the same attempt budget, then `BadResponse`."""
        return await self.request(method, path, tenant=tenant, decode=True, **kwargs)

    async def _sleep_before_retry(self, attempt: int) -> None:
        self.stats.retries += 1
        await asyncio.sleep(self.retry.backoff(attempt))


PageFetcher = Callable[[dict[str, Any]], Awaitable[Any]]


LIST_CHANGED_FIX = "the data is being edited in the ERP right now; retry the partition later"


async def consistent_offset_list(
    fetch_page: PageFetcher,
    params: Mapping[str, Any] | None = None,
    *,
    page_size: int,
    identity: Callable[[Any], Any],
    version_key: str | None = None,
    items_key: str = "values",
    offset_param: str = "from",
    size_param: str = "count",
    max_reads: int = 3,
    where: str = "",
    erp: str | None = None,
    tenant: str | None = None,
) -> list[Any]:
    """A whole offset-paged list, read as one consistent snapshot.

    Offset paging is only correct while the list stands still: a row inserted before the current
    offset shifts the rest, so the next page repeats a row; a removed row makes the next page skip
    one. Both are detected, and the list is then read again from the start:

    - `version_key`: the ERP's version of the *whole* list on every page (Tripletex `versionDigest`);
      a page whose version differs from the first page's means the list changed mid-read (this also
      catches removals, which leave no other trace);
    - `identity`: a row's key (id, account number); a key seen twice is a shifted page (or a broken
      payload) and is never returned.

    After `max_reads` reads that each saw the list change: `UpstreamError` (a version changed) or
    `BadResponse` (the same key twice with a stable version). Nothing partial is returned."""
    problem = ""
    for _ in range(max_reads):
        items: list[Any] = []
        seen: set[Any] = set()
        first_version: Any = None
        offset, problem = 0, ""
        while True:
            body = await fetch_page({**(params or {}), offset_param: offset, size_param: page_size})
            page = _items(body, items_key, where)
            version = body.get(version_key) if version_key and isinstance(body, dict) else None
            if version is not None:
                if first_version is None:
                    first_version = version
                elif version != first_version:
                    problem = "changed"
                    break
            for item in page:
                key = identity(item)
                if key is None:  # no key: the caller's schema check refuses the row
                    continue
                if key in seen:
                    problem = problem or f"duplicate:{key}"
                seen.add(key)
            items.extend(page)
            if problem or len(page) < page_size:
                break
            offset += len(page)
        if not problem:
            return items
        log.info("%s: the list changed while it was paged (%s); reading it again", where, problem)
    if problem == "changed":
        raise UpstreamError(
            f"{where}: the list changed while it was being paged, {max_reads} reads in a row; nothing was stored",
            erp=erp, tenant=tenant, fix=LIST_CHANGED_FIX,
        )
    raise BadResponse(
        f"{where}: the response lists {problem.partition(':')[2]} more than once, {max_reads} reads in a row; "
        "nothing was stored",
        erp=erp, tenant=tenant, fix=LIST_CHANGED_FIX,
    )


async def gather_all(*awaitables: Awaitable[Any]) -> list[Any]:
    """Like `asyncio.gather`, but the first failure cancels the others (and waits for them) before
    it is raised: a failed tenant leaves no requests running behind it."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
    # retrieve every failure (so none is reported as "never retrieved"); raise the first
    failures = [task.exception() for task in tasks if not task.cancelled() and task.exception() is not None]
    if failures:
        raise failures[0]
    return [task.result() for task in tasks]


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
