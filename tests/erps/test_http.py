"""The shared rate limiter (`erps/http.py`), on a fake clock: every figure is exact, nothing sleeps."""

import asyncio
from decimal import Decimal

import httpx
import pytest

from erp_pipelines.erps.base import PUBLISHED_RATE_LIMITS
from erp_pipelines.erps.http import RateLimiter, RateLimitHeaders

HEADERS = RateLimitHeaders(limit="X-Rate-Limit-Limit", remaining="X-Rate-Limit-Remaining", reset="X-Rate-Limit-Reset")


class FakeClock:
    """`clock` and `sleep` for a limiter used by one task at a time: a sleep moves time on at once."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def limiter(requests_per_second=None, max_in_flight=8, **kwargs):
    clock = FakeClock()
    return RateLimiter(requests_per_second, max_in_flight, clock=clock, sleep=clock.sleep, **kwargs), clock


def window(limit, remaining, reset):
    return {"X-Rate-Limit-Limit": str(limit), "X-Rate-Limit-Remaining": str(remaining), "X-Rate-Limit-Reset": str(reset)}


async def request(rate, clock, *, latency=0.0, headers=None, status=200):
    """One request through the limiter, as `ApiClient` makes it: the slot, then the feedback."""
    async with rate.slot():
        sent = clock.now
        clock.now += latency
    headers = httpx.Headers(headers or {})
    if status == 429:
        return sent, rate.on_rate_limited(headers, HEADERS)
    rate.observe_headers(headers, HEADERS)
    return sent, None


def run(coro):
    return asyncio.run(coro)


def test_token_bucket_paces_to_the_published_rate():
    rate, clock = limiter(4, 1)  # Fiken: 4 requests/s, one in flight

    async def scenario():
        return [(await request(rate, clock))[0] for _ in range(10)]

    sent = run(scenario())
    # a second's worth (4) at once, then one every 0.25 s
    assert sent == pytest.approx([0, 0, 0, 0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5])


def test_headers_spend_the_window_then_wait_for_its_end():
    rate, clock = limiter()

    async def scenario():
        sent = []
        for remaining in (4, 3, 2, 1, 0):  # a window of 5 requests per second, in whole-second resets
            sent.append((await request(rate, clock, latency=0.05, headers=window(5, remaining, 1)))[0])
        sent.append((await request(rate, clock, latency=0.05, headers=window(5, 4, 1)))[0])
        return sent

    sent = run(scenario())
    assert sent[:5] == pytest.approx([0, 0.05, 0.1, 0.15, 0.2])  # no pause while the window has credits
    # then the next request waits for the window's end: its first request's send time + 1 s (the
    # longest reset seen) + 5 ms; a reset header read as "1 s from now" would have waited until 1.25
    assert sent[5] == pytest.approx(1.005)
    assert rate.window_limit == 5 and rate.window_seconds == 1


def test_requests_in_flight_are_not_counted_twice():
    rate, clock = limiter()

    async def scenario():
        await request(rate, clock, headers=window(10, 9, 1))  # the window's first request
        answered, hold = asyncio.Event(), asyncio.Event()

        async def answered_late():  # sent second, answered after two more were sent
            async with rate.slot():
                await answered.wait()
            rate.observe_headers(httpx.Headers(window(10, 8, 1)), HEADERS)

        async def held():
            async with rate.slot():
                await hold.wait()

        tasks = [asyncio.create_task(answered_late()), asyncio.create_task(held()), asyncio.create_task(held())]
        for _ in range(3):
            await asyncio.sleep(0)
        answered.set()
        await tasks[0]
        credits = rate._credits
        hold.set()
        await asyncio.gather(*tasks)
        return credits

    # 8 left when the second request was counted; the two sent after it are not in that figure
    assert run(scenario()) == 6


def test_429_without_reset_header_pauses_until_the_modelled_window_end():
    rate, clock = limiter()

    async def scenario():
        await request(rate, clock, latency=0.05, headers=window(5, 4, 1))  # the window's first request, t=0
        clock.now = 0.3
        _, pause = await request(rate, clock, status=429)  # Tripletex's 429: no reset header
        sent, _ = await request(rate, clock, headers=window(5, 4, 1))
        return pause, sent

    pause, sent = run(scenario())
    assert pause == pytest.approx(1.005 - 0.3)  # not the 1 s the last reset header said
    assert sent == pytest.approx(1.005)


def test_429_after_an_early_guess_probes_briefly():
    rate, clock = limiter()

    async def scenario():
        for remaining in (1, 0):
            await request(rate, clock, headers=window(2, remaining, 1))
        sent, _ = await request(rate, clock, status=429)  # the model took the window for ended: too early
        return sent, rate._paused_until

    sent, paused_until = run(scenario())
    assert sent == pytest.approx(1.0)  # the window's upper bound: its last answer + the reset
    assert paused_until == pytest.approx(1.0 + 1 / 50)  # a fiftieth of the window, then try again


def test_429_without_any_model_backs_off_and_one_burst_does_not_escalate():
    rate, clock = limiter()

    async def scenario():
        async with rate.slot(), rate.slot():
            pass  # two requests sent together ...
        first = rate.on_rate_limited(httpx.Headers(), HEADERS)  # ... both refused
        second = rate.on_rate_limited(httpx.Headers(), HEADERS)
        _, third = await request(rate, clock, status=429)  # sent after the pause: refused again
        return first, second, third

    first, second, third = run(scenario())
    assert 0.5 <= first <= 0.6  # 0.5 s with up to 20 % jitter
    assert second == pytest.approx(first)  # the same incident: the pause stands, no doubling
    assert 1.0 <= third <= 1.2  # a new 429 after the pause doubles it


def test_retry_after_is_honoured():
    rate, clock = limiter()

    async def scenario():
        _, pause = await request(rate, clock, status=429, headers={"Retry-After": "2"})
        sent, _ = await request(rate, clock)
        return pause, sent

    pause, sent = run(scenario())
    assert pause == 2.0
    assert sent == 2.0
    assert clock.sleeps == [2.0]


def test_reset_header_on_a_429_is_honoured():
    rate, clock = limiter()

    async def scenario():
        return (await request(rate, clock, status=429, headers={"X-Rate-Limit-Reset": "3"}))[1]

    assert run(scenario()) == 3.0


def test_requests_in_flight_are_bounded():
    rate = RateLimiter(None, 3)
    release = None

    async def scenario():
        nonlocal release
        release = asyncio.Event()
        entered = []

        async def one(i):
            async with rate.slot():
                entered.append(i)
                await release.wait()

        tasks = [asyncio.create_task(one(i)) for i in range(10)]
        for _ in range(5):
            await asyncio.sleep(0)
        held = (len(entered), rate.in_flight)
        tasks[9].cancel()  # a waiter that gives up leaves no slot behind
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        return held, sorted(entered), rate.in_flight, rate.peak_in_flight

    held, entered, in_flight, peak = run(scenario())
    assert held == (3, 3)
    assert entered == list(range(9))
    assert in_flight == 0 and peak == 3


def test_concurrency_follows_latency_up_to_the_ceiling_only_without_a_published_cap():
    adaptive, clock = limiter(10, 4, in_flight_ceiling=8)
    published, other_clock = limiter(10, 4)

    async def scenario():
        for rate, c in ((adaptive, clock), (published, other_clock)):
            await request(rate, c, latency=0.2)  # 10 req/s × 0.2 s × 1.5 + 1 = 4: no change
            first = rate.in_flight_limit
            await request(rate, c, latency=0.5)  # the lowest recent latency counts: still 0.2 s
            second = rate.in_flight_limit
            rate._latencies.clear()
            await request(rate, c, latency=0.5)  # 10 × 0.5 × 1.5 + 1 = 9, capped at the ceiling
            yield first, second, rate.in_flight_limit

    async def collect():
        return [values async for values in scenario()]

    assert run(collect()) == [(4, 4, 8), (4, 4, 4)]


def test_published_limits_are_data_in_one_place():
    assert PUBLISHED_RATE_LIMITS["fiken"].requests_per_second == 4
    assert PUBLISHED_RATE_LIMITS["fiken"].max_in_flight == 1
    assert PUBLISHED_RATE_LIMITS["fiken"].in_flight_ceiling is None
    assert PUBLISHED_RATE_LIMITS["poweroffice"].requests_per_second == 10
    assert PUBLISHED_RATE_LIMITS["eaccounting"].requests_per_second == PUBLISHED_RATE_LIMITS[
        "businessnxt"].requests_per_second == 600 / 60
    assert PUBLISHED_RATE_LIMITS["tripletex"].requests_per_second is None  # follows the headers
    assert PUBLISHED_RATE_LIMITS["vismanet"].requests_per_second is None
    fiken = RateLimiter.for_rate_limit(PUBLISHED_RATE_LIMITS["fiken"])
    assert (fiken.requests_per_second, fiken.max_in_flight, fiken.in_flight_ceiling) == (4, 1, 1)


def test_sharded_transport_spreads_requests_over_small_pools_and_frees_them():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from erp_pipelines.erps.http import ShardedTransport
    from erp_pipelines.sandbox.common import serve

    async def slow(request):
        await asyncio.sleep(0.05)
        return JSONResponse({"n": int(request.query_params["n"])})

    transport = ShardedTransport(shards=4, per_shard=2)
    peak = []

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, transport=transport) as client:
            async def one(n):
                response = await client.get("/", params={"n": n})
                peak.append(max(transport._busy))
                return response.json()["n"]

            answers = await asyncio.gather(*(one(n) for n in range(8)))
            return answers, list(transport._busy)

    with serve(Starlette(routes=[Route("/", slow)])) as url:
        answers, busy_after = run(scenario(url))
    assert answers == list(range(8))
    assert max(peak) <= 2  # 8 at once over 4 shards of 2: every shard used, none over its size
    assert busy_after == [0, 0, 0, 0]  # each connection counted free once its body was read


def test_api_client_counts_the_time_requests_wait_for_the_limiter():
    from erp_pipelines.erps.http import ApiClient

    def app_transport(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"value": 1.25})

    async def scenario():
        client = ApiClient(erp="test", base_url="http://erp.test/", limiter=RateLimiter(20, 4),
                           transport=httpx.MockTransport(app_transport))
        try:
            values = await asyncio.gather(*(client.get_json("x") for _ in range(25)))
        finally:
            await client.aclose()
        return values, client.stats

    values, stats = asyncio.run(scenario())
    assert stats.requests == 25 and values[0] == {"value": Decimal("1.25")}
    # a bucket of 20 at 20 req/s: the last 5 requests wait about 0.25 s between them
    assert stats.throttled_seconds > 0.1
    assert stats.as_metadata()["throttled_seconds"] == round(stats.throttled_seconds, 3)
