"""Client-side rate limiting that holds against any server: fixed window, sliding window or token
bucket, with or without rate-limit headers, with or without `Retry-After`.

One `Throttle` per credential per process (`Throttle.shared`), shared by every tenant, connector
and event loop that uses the credential (one subscription key may serve many client keys).

- **Pacing, never bursts.** Requests are spaced evenly at `HEADROOM` of the allowed rate. An even
  pace below the limit stays under it whatever the server counts: any fixed window, any sliding
  window and any token bucket of that rate admit it. (Spending a window's credits at once and then
  waiting is what a sliding-window server punishes with a 429 storm.)
- **The allowed rate** is the published one (`RateLimit.requests_per_second`) or, where none is
  published, `limit / window` from the ERP's rate-limit headers, the window being the longest
  reset seen. Where the headers will tell, the first request goes alone, unpaced, and its answer
  sets the pace; where nothing will tell, the rate is probed upward from `PROBE_START`.
- **AIMD.** A 429 halves the rate (once per incident: 429s of requests sent before the cut belong
  to it) and pauses every request of the credential for `Retry-After`, else the reset header, else
  a back-off. Each success then adds a little, so the rate climbs back to the ceiling in about
  `RECOVERY_SECONDS`.
- **In flight.** A published cap is hard (even a cap of 1). Otherwise Little's law: enough requests in
  flight to reach the rate at the server's latency, at most `IN_FLIGHT_CEILING`.
- **Credits.** `remaining` from the headers, less the requests sent since, pauses the credential
  until the reported reset when it runs out (a limit shared with other processes).

`clock` and `sleep` are injectable, so tests run on a fake clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import math
import random
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, ClassVar


@dataclasses.dataclass(frozen=True)
class RateLimitHeaders:
    """Names of an ERP's rate-limit headers. `reset_is_delta`: seconds left, else an epoch time."""

    limit: str | None = None
    remaining: str | None = None
    reset: str | None = None
    reset_is_delta: bool = True


@dataclasses.dataclass(frozen=True)
class RateLimit:
    """An ERP's published limit per credential (facts: its NOTES.md, cited in `source`)."""

    requests_per_second: float | None = None  # None: learn it from the headers
    max_in_flight: int | None = None  # a published concurrency cap; None: none is published
    headers: RateLimitHeaders | None = None
    source: str = ""


class _Waiter:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.admitted = False


@dataclasses.dataclass
class _Ticket:
    sent: float
    generation: int  # the rate cut in force when the request was sent


class Throttle:
    """Rate and concurrency for one credential; see the module docstring."""

    HEADROOM = 0.95
    PROBE_START = 4.0  # requests/s while nothing is known
    MIN_RATE = 0.2
    RECOVERY_SECONDS = 20.0
    IN_FLIGHT_CEILING = 64
    _registry: ClassVar[dict[str, Throttle]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        limit: RateLimit,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.limit = limit
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        published = limit.requests_per_second
        self.ceiling: float | None = published * self.HEADROOM if published else None
        self.rate: float = self.ceiling or self.PROBE_START
        self._next_send = 0.0
        self._paused_until = 0.0
        self._generation = 0
        self._backoff = 0
        # in flight
        self.in_flight = 0
        self.peak_in_flight = 0
        self._probing = bool(limit.headers) and not published  # one request first: its headers set the pace
        self._in_flight_limit = limit.max_in_flight or (1 if self._probing else 2)
        self._waiters: deque[_Waiter] = deque()
        self._latencies: deque[float] = deque(maxlen=100)
        # what the headers told
        self.window_limit: int | None = None
        self.window_seconds: float | None = None
        self._credits: float | None = None
        self._resets: deque[int] = deque(maxlen=64)
        self.waited_seconds = 0.0

    @classmethod
    def shared(cls, key: str, limit: RateLimit) -> Throttle:
        """The process's one throttle for a credential (`key`: a hash naming it, never the secret)."""
        with cls._registry_lock:
            throttle = cls._registry.get(key)
            if throttle is None:
                throttle = cls._registry[key] = cls(limit)
            return throttle

    # ------------------------------------------------------------------------------ the turn

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[_Ticket]:
        """Hold one request's turn: within the in-flight limit, the pace and any pause."""
        await self._enter()
        try:
            yield await self._wait_for_pace()
        finally:
            self._leave()

    async def _enter(self) -> None:
        with self._lock:
            if self.in_flight < self._in_flight_limit and not self._waiters:
                self._admit()
                return
            waiter = _Waiter(asyncio.get_running_loop())
            self._waiters.append(waiter)
        try:
            await waiter.future  # `_wake_locked` admits us before it resolves the future
        except asyncio.CancelledError:
            with self._lock:
                if waiter.admitted:
                    self.in_flight -= 1
                    self._wake_locked()
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
            raise

    def _admit(self) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1
            self._wake_locked()

    def _wake_locked(self) -> None:
        while self._waiters and self.in_flight < self._in_flight_limit:
            waiter = self._waiters.popleft()
            if waiter.future.done() or waiter.loop.is_closed():
                continue
            self._admit()
            waiter.admitted = True
            waiter.loop.call_soon_threadsafe(_resolve, waiter.future)

    async def _wait_for_pace(self) -> _Ticket:
        while True:
            with self._lock:
                now = self._clock()
                at = max(now, self._next_send, self._paused_until)
                if at <= now:
                    self._next_send = max(self._next_send, now) + self._interval
                    return self._take(now)
                if self._paused_until <= now:  # reserve the paced send time
                    self._next_send = at + self._interval
                    ticket = self._take(at)
                else:
                    ticket = None
            self.waited_seconds += at - now
            await self._sleep(at - now)
            woke = self._clock()
            # a turn missed by more than one interval (a busy event loop) is taken again, in the
            # pace: late waiters must not all go at once, which is the burst pacing prevents
            if ticket is not None and woke >= self._paused_until and woke - at <= max(self._interval, 0.02):
                return ticket

    @property
    def _interval(self) -> float:
        return 0.0 if self._probing else 1.0 / self.rate

    def _take(self, at: float) -> _Ticket:
        if self._credits is not None:
            self._credits -= 1
        return _Ticket(at, self._generation)

    # ------------------------------------------------------------------------------ feedback

    def observe(self, ticket: _Ticket, headers: Mapping[str, str]) -> None:
        """A response other than 429: its latency, its rate-limit headers, and a little more rate."""
        with self._lock:
            now = self._clock()
            self._latencies.append(max(0.0, now - ticket.sent))
            self._backoff = 0
            self._read_headers(headers, now)
            if self._probing:  # the probe counts in the pace it has just set
                self._probing = False
                self._next_send = max(self._next_send, ticket.sent + self._interval)
            if self.ceiling is None or self.rate < self.ceiling:
                step = (self.ceiling or self.rate * 4) / (self.RECOVERY_SECONDS * max(self.rate, 1.0))
                self.rate = self.rate + step if self.ceiling is None else min(self.ceiling, self.rate + step)
            self._size_in_flight()

    def on_rate_limited(self, ticket: _Ticket, headers: Mapping[str, str]) -> float:
        """A 429: cut the rate once per incident and pause the credential; returns the pause."""
        with self._lock:
            now = self._clock()
            self._read_headers(headers, now)
            self._probing = False
            if ticket.generation == self._generation:  # the first 429 of this incident
                self._generation += 1
                self.rate = max(self.MIN_RATE, self.rate * 0.5)
                self._backoff += 1
            pause = _retry_after(headers.get("retry-after"))
            if pause is None:
                pause = self._reset_seconds(headers)
            if pause is None:
                pause = min(30.0, (self.window_seconds or 1.0) * 2 ** (self._backoff - 1)) * random.uniform(1.0, 1.2)
            self._pause_locked(now + pause)
            self._size_in_flight()
            return pause

    def pause_for(self, seconds: float) -> None:
        """Pause the credential (a throttling code in a response body, for instance)."""
        with self._lock:
            self._pause_locked(self._clock() + max(0.0, seconds))

    def _pause_locked(self, until: float) -> None:
        self._paused_until = max(self._paused_until, until)
        self._next_send = max(self._next_send, self._paused_until)

    def _read_headers(self, headers: Mapping[str, str], now: float) -> None:
        names = self.limit.headers
        if names is None or names.remaining is None:
            return
        limit = _number(headers.get(names.limit)) if names.limit else None
        remaining = _number(headers.get(names.remaining))
        reset = self._reset_seconds(headers)
        if limit is not None and limit >= 1:
            self.window_limit = int(limit)
        if reset is not None:
            self._resets.append(math.ceil(reset))
            self.window_seconds = float(_window_length(self._resets))
        if self.window_limit and self.window_seconds and not self.limit.requests_per_second:
            ceiling = self.window_limit / self.window_seconds * self.HEADROOM
            if self.ceiling is None:
                self.rate = ceiling  # the first news of the limit: go straight to it
            self.ceiling = ceiling
            self.rate = min(self.rate, ceiling)
        if remaining is not None:
            self._credits = remaining - (self.in_flight - 1)  # the others in flight spend it too
            # `reset` is in whole seconds, rounded up: one second or less may end any moment (the
            # even pace alone fills a small window to its last credit), so only a longer one pauses
            if self._credits < 1 and reset is not None and reset > 1:
                self._pause_locked(now + reset)

    def _reset_seconds(self, headers: Mapping[str, str]) -> float | None:
        names = self.limit.headers
        value = _number(headers.get(names.reset)) if names and names.reset else None
        if value is None:
            return None
        return max(0.0, value if names.reset_is_delta else value - time.time())

    def _size_in_flight(self) -> None:
        if self.limit.max_in_flight:
            limit = self.limit.max_in_flight
        elif self._latencies:
            wanted = math.ceil(self.rate * min(self._latencies) * 1.5) + 1
            limit = max(2, min(self.IN_FLIGHT_CEILING, wanted))
        else:
            limit = self._in_flight_limit
        if limit != self._in_flight_limit:
            self._in_flight_limit = limit
            self._wake_locked()

    # ------------------------------------------------------------------------------ figures

    @property
    def in_flight_limit(self) -> int:
        return self._in_flight_limit

    def allowed_rate(self) -> float | None:
        """Requests per second the ERP allows, as published or as its headers tell."""
        if self.limit.requests_per_second:
            return self.limit.requests_per_second
        if self.window_limit and self.window_seconds:
            return self.window_limit / self.window_seconds
        return None


def _window_length(resets: deque[int]) -> int:
    """The window's length: the longest reset seen at least twice lately (one odd value, such
    as a reset rounded up at a window's edge, must not halve the rate), else the longest seen."""
    seen_twice = [value for value, count in Counter(resets).items() if count > 1]
    return max(1, max(seen_twice) if seen_twice else max(resets))


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    seconds = _number(value)
    if seconds is not None:
        return max(0.0, seconds)
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    return None
