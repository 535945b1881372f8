"""Helpers for test_kit: a fake clock for asyncio, a rate-limited server simulated on it, a scripted
fake HTTP server, and the child process of the cross-process refresh test."""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import math
import selectors
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import parse_qs

import httpx

from erp_pipelines.erps.kit import RateLimitHeaders, Throttle

# ---------------------------------------------------------------------------------------- fake clock


class FakeClock:
    """Simulated seconds. `run(main)` runs `main` on an event loop whose time is this clock: whenever
    every task waits, the clock jumps to the next timer, so `sleep` advances simulated time and costs
    no real time, and concurrent sleepers wake in deadline order (exact, deterministic)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def run(self, main: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=lambda: _FakeTimeLoop(self)) as runner:
            return runner.run(main)


class _FakeTimeSelector(selectors.DefaultSelector):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None):
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:  # nothing scheduled: only another thread can wake the loop
            return super().select(None)
        self.clock.now += timeout  # every task waits for a timer: jump to it
        return []


class _FakeTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(_FakeTimeSelector(clock))
        self._fake_clock = clock

    def time(self) -> float:
        return self._fake_clock.now


# ---------------------------------------------------------------------------------------- simulated server

TRIPLETEX_HEADERS = RateLimitHeaders("X-Rate-Limit-Limit", "X-Rate-Limit-Remaining", "X-Rate-Limit-Reset")
MODES = ("fixed", "sliding", "token_bucket")
_EPS = 1e-9  # float slack: a request paced at exactly the limit is admitted


def _seconds_up(seconds: float) -> int:
    return max(0, math.ceil(seconds - _EPS))


class SimulatedServer:
    """An ERP admitting `limit` requests per second, counted the `mode` way (the sandbox's three modes):
    "fixed" (a window opens with the first request after the previous one ended), "sliding" (at most
    `limit` in any 1-second interval) or "token_bucket" (capacity `limit`, refilled at `limit`/s).
    `admit` answers allowed, remaining, and reset in whole seconds rounded up (when the window ends,
    the oldest request leaves the interval, or the bucket is full)."""

    def __init__(self, mode: str, limit: int, clock: FakeClock) -> None:
        assert mode in MODES
        self.mode, self.limit, self.clock = mode, limit, clock
        self.window_start = -math.inf
        self.used = 0
        self.log: deque[float] = deque()
        self.tokens, self.refilled = float(limit), clock.now

    def admit(self) -> tuple[bool, int, int]:
        now = self.clock.now
        if self.mode == "fixed":
            if now - self.window_start >= 1 - _EPS:
                self.window_start, self.used = now, 0
            allowed = self.used < self.limit
            self.used += allowed
            return allowed, self.limit - self.used, _seconds_up(self.window_start + 1 - now)
        if self.mode == "sliding":
            while self.log and now - self.log[0] >= 1 - _EPS:
                self.log.popleft()
            allowed = len(self.log) < self.limit
            if allowed:
                self.log.append(now)
            return allowed, self.limit - len(self.log), _seconds_up(self.log[0] + 1 - now) if self.log else 0
        self.tokens = min(self.limit, self.tokens + (now - self.refilled) * self.limit)
        self.refilled = now
        allowed = self.tokens >= 1 - _EPS
        self.tokens -= allowed
        return allowed, math.floor(self.tokens + _EPS), _seconds_up((self.limit - self.tokens) / self.limit)


@dataclasses.dataclass(frozen=True)
class Send:
    at: float  # when the server received it
    status: int  # 200 or 429
    answered: float  # when the client saw the answer


@dataclasses.dataclass
class Run:
    sends: list[Send]
    peak_in_flight: int
    started: float

    def ok_within(self, seconds: float) -> int:
        return sum(1 for s in self.sends if s.status == 200 and s.at < self.started + seconds)

    def rate_limited(self, *, after: float = -math.inf) -> int:
        return sum(1 for s in self.sends if s.status == 429 and s.at >= after)

    def sent(self, *, after: float = -math.inf) -> int:
        return sum(1 for s in self.sends if s.at >= after)

    def most_in_any_second(self) -> int:
        times = sorted(s.at for s in self.sends)
        return max(bisect.bisect_left(times, t + 1.0 - _EPS) - i for i, t in enumerate(times))

    def first_answer(self) -> float:
        return min(s.answered for s in self.sends)


def simulate(
    throttle: Throttle, clock: FakeClock, *, mode: str, limit: int, seconds: float = 30.0, workers: int = 16,
    latency: float = 0.05, server_in_flight: int | None = None, report_headers: bool = False,
) -> Run:
    """`workers` tasks send requests through `throttle` for `seconds` simulated seconds, as `ApiClient`
    does (the turn held while the request is out, then `observe` or `on_rate_limited`), to a
    `SimulatedServer`, which also refuses a request beyond `server_in_flight` at once. The server
    decides when a request arrives; the client sees the answer `latency` later. With `report_headers`
    every answer carries Tripletex's rate-limit headers (limit, remaining, reset)."""
    server = SimulatedServer(mode, limit, clock)
    sends: list[Send] = []
    in_flight = peak = 0
    started = clock.now
    end = started + seconds

    async def worker() -> None:
        nonlocal in_flight, peak
        while clock.now < end:
            async with throttle.slot() as ticket:
                arrived = clock.now
                in_flight += 1
                peak = max(peak, in_flight)
                allowed, remaining, reset = server.admit()
                if server_in_flight is not None and in_flight > server_in_flight:
                    allowed = False
                await clock.sleep(latency)
                in_flight -= 1
            headers = httpx.Headers()
            if report_headers:
                headers = httpx.Headers({TRIPLETEX_HEADERS.limit: str(limit), TRIPLETEX_HEADERS.remaining:
                                         str(remaining), TRIPLETEX_HEADERS.reset: str(reset)})
            sends.append(Send(arrived, 200 if allowed else 429, clock.now))
            if allowed:
                throttle.observe(ticket, headers)
            else:
                throttle.on_rate_limited(ticket, headers)

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(workers)))

    clock.run(main())
    return Run(sends, peak, started)


# ---------------------------------------------------------------------------------------- fake HTTP server

Answer = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


class FakeServer:
    """An in-process HTTP server for `ApiClient` (`transport=server.transport`): each request gets the
    next scripted answer, a response, an exception to raise (a dropped connection) or a function of
    the request; the last answer repeats. `requests` keeps what arrived, `times` when (by `clock`)."""

    def __init__(self, *answers: Answer, clock: Callable[[], float] | None = None) -> None:
        self.answers: list[Answer] = list(answers)
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []
        self._clock = clock
        self.transport = httpx.MockTransport(self._handle)

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.requests.append(request)
        self.times.append(self._clock() if self._clock else 0.0)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer(request) if callable(answer) else answer


def json_reply(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


# ---------------------------------------------------------------------------------------- cross-process refresh


def rotating_token_endpoint(refresh_token: str, *, delay: float) -> tuple[Any, dict[str, Any]]:
    """A starlette token endpoint (POST /oauth/token) whose refresh tokens rotate: it accepts only the
    refresh token it issued last, answers after `delay` seconds, and counts into the returned dict."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    issued: dict[str, Any] = {"refresh_token": refresh_token, "access_token": None, "refreshes": 0, "refused": 0}

    async def token(request):
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        if form.get("grant_type") != "refresh_token" or form.get("refresh_token") != issued["refresh_token"]:
            issued["refused"] += 1
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        issued["refreshes"] += 1
        issued["refresh_token"] = f"rotated-refresh-token-{issued['refreshes']}"
        issued["access_token"] = f"access-token-{issued['refreshes']}-from-refresh"
        await asyncio.sleep(delay)  # meanwhile the other process asks for the consent's lock
        return JSONResponse({"access_token": issued["access_token"], "expires_in": 3600,
                             "refresh_token": issued["refresh_token"]})

    return Starlette(routes=[Route("/oauth/token", token, methods=["POST"])]), issued


def refresh_in_child(url: str, store_path: str, key: str, entry: str, barrier: Any, results: Any) -> None:
    """A process of its own: wait for the other one, then ask `RefreshingToken` for the consent's access
    token; puts the token (or the error's text) on `results`."""
    from erp_pipelines.erps.kit import ApiClient, RateLimit, RefreshingToken, refused_by_token_endpoint
    from erp_pipelines.errors import AuthError
    from erp_pipelines.tokens import TokenStore

    async def token() -> str:
        client = ApiClient(erp="testerp", base_url=url, throttle=Throttle(RateLimit(requests_per_second=1000)))
        try:
            provider = RefreshingToken(
                client, f"{url}/oauth/token", "client-id", "client-secret-7d2e41",
                refused=refused_by_token_endpoint("testerp", "consent again"),
                missing=lambda: AuthError("no consent", erp="testerp"),
                store=TokenStore(store_path, key=key), store_entry=entry,
            )
            barrier.wait(timeout=60)
            return await provider.token()
        finally:
            await client.aclose()

    try:
        results.put(asyncio.run(token()))
    except Exception as error:  # noqa: BLE001 - the parent reports it
        results.put(f"failed: {type(error).__name__}: {error}")
