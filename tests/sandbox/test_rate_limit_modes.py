"""The sandbox's server-side rate limiter in its three window modes (fixed, sliding, token bucket),
on a fake clock: admit/refuse patterns, header values, the in-flight cap and the admin route."""

from __future__ import annotations

import datetime as dt

import httpx
import pytest
from asgi_support import SyncASGITransport

from erp_pipelines.sandbox.common import WINDOW_MODES, RateLimiter, RateLimitPolicy
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.tripletex import (
    DEFAULT_ACCOUNTANT_EMPLOYEE_TOKEN,
    DEFAULT_CONSUMER_TOKEN,
    TripletexSandbox,
)

KEY = "employee-token-1"


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_limiter(mode: str, limit: int | None, window_seconds: float, **policy) -> tuple[RateLimiter, FakeClock]:
    clock = FakeClock()
    policy = RateLimitPolicy(limit=limit, window_seconds=window_seconds, mode=mode, **policy)
    return RateLimiter(policy, clock), clock


def admit_pattern(limiter: RateLimiter, clock: FakeClock, times: list[float]) -> str:
    """'+' per admitted request, '-' per refused one; each admitted request finishes at once."""
    pattern = ""
    for at in times:
        clock.now = at
        decision = limiter.acquire(KEY)
        if decision.allowed:
            limiter.release(KEY)
        pattern += "+" if decision.allowed else "-"
    return pattern


def headers(limiter: RateLimiter, clock: FakeClock, at: float) -> tuple[bool, int | None, int | None]:
    """(allowed, remaining, reset) of one request at `at` (finished at once)."""
    clock.now = at
    decision = limiter.acquire(KEY)
    if decision.allowed:
        limiter.release(KEY)
    return decision.allowed, decision.remaining, decision.reset_seconds


# ---------------------------------------------------------------------------------------- patterns


@pytest.mark.parametrize("mode", WINDOW_MODES)
def test_a_burst_gets_exactly_the_limit(mode):
    limiter, clock = make_limiter(mode, limit=5, window_seconds=1.0)
    assert admit_pattern(limiter, clock, [10.0] * 8) == "+++++---"


@pytest.mark.parametrize("mode", WINDOW_MODES)
def test_requests_paced_at_the_limit_are_all_admitted(mode):
    limiter, clock = make_limiter(mode, limit=4, window_seconds=1.0)
    assert admit_pattern(limiter, clock, [k * 0.25 for k in range(40)]) == "+" * 40  # every 0.25 s for 10 s


@pytest.mark.parametrize("mode", ["sliding", "token_bucket"])
def test_pacing_at_the_limit_tolerates_float_clocks(mode):
    limiter, clock = make_limiter(mode, limit=10, window_seconds=1.0)
    # k * 0.1 is not exact in binary: some gaps come out a hair under 0.1 s
    assert admit_pattern(limiter, clock, [k * 0.1 for k in range(100)]) == "+" * 100


@pytest.mark.parametrize(("mode", "expected"), [
    # 5 per window, then nothing until the window (from the first request) ends / the oldest leaves
    ("fixed", "+++++-----" * 2),
    ("sliding", "+++++-----" * 2),
    # the bucket refills 0.5 token per 0.1 s: 5 + 4 refilled in the first second, then every other
    ("token_bucket", "+++++++++-" + "+-" * 5),
])
def test_requests_at_twice_the_limit(mode, expected):
    limiter, clock = make_limiter(mode, limit=5, window_seconds=1.0)
    assert admit_pattern(limiter, clock, [k * 0.1 for k in range(20)]) == expected


def test_sliding_window_refuses_a_burst_straddling_a_fixed_window_boundary():
    # limit 10 per 1 s. A request at t=0 opens the fixed window [0, 1); 9 more at 0.9 end it, 10 at
    # 1.1 open the next: the fixed window admits 19 requests within 0.2 s, the sliding window only
    # as many as have left its last second (the one at t=0).
    times = [0.0] + [0.9] * 9 + [1.1] * 10
    fixed, fixed_clock = make_limiter("fixed", limit=10, window_seconds=1.0)
    sliding, sliding_clock = make_limiter("sliding", limit=10, window_seconds=1.0)
    assert admit_pattern(fixed, fixed_clock, times) == "+" * 20
    assert admit_pattern(sliding, sliding_clock, times) == "+" * 10 + "+" + "-" * 9
    # the sliding window admits again as its requests leave it: 9 at 1.9 (those of 0.9)
    assert admit_pattern(sliding, sliding_clock, [1.9] * 10) == "+" * 9 + "-"


def test_token_bucket_refill_arithmetic():
    limiter, clock = make_limiter("token_bucket", limit=10, window_seconds=2.0)  # 5 tokens per second
    assert admit_pattern(limiter, clock, [0.0] * 11) == "+" * 10 + "-"  # a full bucket to start with
    assert headers(limiter, clock, 0.1) == (False, 0, 2)  # 0.5 token: not a whole one
    assert headers(limiter, clock, 0.2) == (True, 0, 2)  # 1 token, spent
    assert headers(limiter, clock, 1.2) == (True, 4, 2)  # 5 refilled, 1 spent: 4 left, 6 missing = 1.2 s
    assert headers(limiter, clock, 1.4) == (True, 4, 2)  # 4 + 1 - 1
    assert headers(limiter, clock, 60.0) == (True, 9, 1)  # refilled to the capacity (10), not beyond
    assert admit_pattern(limiter, clock, [60.0] * 10) == "+" * 9 + "-"


# ---------------------------------------------------------------------------------------- header values


def test_fixed_window_headers():
    limiter, clock = make_limiter("fixed", limit=3, window_seconds=60)
    assert [headers(limiter, clock, t) for t in (1000, 1010, 1020, 1030)] == [
        (True, 2, 60), (True, 1, 50), (True, 0, 40), (False, 0, 30),
    ]
    assert headers(limiter, clock, 1060) == (True, 2, 60)  # a new window opens


def test_sliding_window_headers():
    limiter, clock = make_limiter("sliding", limit=3, window_seconds=60)
    # reset: until the oldest admitted request in the window leaves it
    assert [headers(limiter, clock, t) for t in (0, 10, 20, 30)] == [
        (True, 2, 60), (True, 1, 50), (True, 0, 40), (False, 0, 30),
    ]
    assert headers(limiter, clock, 60) == (True, 0, 10)  # t=0 left; 10, 20, 60 in the window
    assert headers(limiter, clock, 69.5) == (False, 0, 1)  # rounded up
    assert headers(limiter, clock, 70) == (True, 0, 10)
    assert headers(limiter, clock, 200) == (True, 2, 60)


def test_sliding_window_reset_is_at_least_one_second_when_nothing_remains():
    limiter, clock = make_limiter("sliding", limit=0, window_seconds=60)
    assert headers(limiter, clock, 0) == (False, 0, 1)


def test_token_bucket_headers():
    limiter, clock = make_limiter("token_bucket", limit=3, window_seconds=60)  # a token per 20 s
    # reset: until the bucket is full again
    assert [headers(limiter, clock, 0) for _ in range(4)] == [
        (True, 2, 20), (True, 1, 40), (True, 0, 60), (False, 0, 60),
    ]
    assert headers(limiter, clock, 30) == (True, 0, 50)  # 1.5 tokens, 1 spent: 2.5 missing
    assert headers(limiter, clock, 30) == (False, 0, 50)
    assert headers(limiter, clock, 200) == (True, 2, 20)


# ---------------------------------------------------------------------------------------- in flight


@pytest.mark.parametrize("mode", WINDOW_MODES)
def test_in_flight_cap_in_every_mode(mode):
    limiter, _ = make_limiter(mode, limit=5, window_seconds=60, max_in_flight=2)
    first, second, third = (limiter.acquire(KEY) for _ in range(3))
    assert (first.allowed, second.allowed) == (True, True)
    assert (third.allowed, third.reason, third.remaining) == (False, "too many in flight", 3)  # not counted
    assert limiter.acquire("another-key").allowed  # the cap is per key
    limiter.release(KEY)
    fourth = limiter.acquire(KEY)
    assert (fourth.allowed, fourth.remaining) == (True, 2)
    assert not limiter.acquire(KEY).allowed


@pytest.mark.parametrize("mode", WINDOW_MODES)
def test_in_flight_cap_without_a_request_limit(mode):
    limiter, _ = make_limiter(mode, limit=None, window_seconds=60, max_in_flight=1)
    assert limiter.acquire(KEY) == limiter.acquire("another-key")
    refused = limiter.acquire(KEY)
    assert not refused.allowed and refused.limit is refused.remaining is refused.reset_seconds is None
    limiter.release(KEY)
    assert limiter.acquire(KEY).allowed


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown rate-limit mode 'leaky'"):
        RateLimitPolicy(limit=1, mode="leaky")
    with pytest.raises(ValueError, match="unknown rate-limit mode"):
        RateLimitPolicy.from_json({"limit": 1, "mode": "leaky"})
    assert RateLimitPolicy.from_json({"limit": 1, "mode": "sliding"}).mode == "sliding"
    assert RateLimitPolicy().mode == "fixed"


# ---------------------------------------------------------------------------------------- admin route


def test_switching_mode_through_the_admin_route():
    today = dt.date(2026, 4, 15)
    sandbox = TripletexSandbox(generate_ledger(2), today=today)
    clock = FakeClock(1000.0)
    sandbox.rate_limiter.clock = clock
    transport = SyncASGITransport(sandbox.app)
    with httpx.Client(transport=transport, base_url="http://tripletex.test") as http:
        session = http.post("/v2/token/session/:create", json={
            "consumerToken": DEFAULT_CONSUMER_TOKEN, "employeeToken": DEFAULT_ACCOUNTANT_EMPLOYEE_TOKEN,
            "expirationDate": (today + dt.timedelta(days=7)).isoformat(),
        }).json()["value"]["token"]
        client_id = sandbox.ledger.tenants[0].erp_client_id

        def limited(at: float) -> tuple[int, str | None, str | None]:
            clock.now = at
            response = http.get("/v2/ledger/account", auth=(str(client_id), session))
            return response.status_code, response.headers.get("X-Rate-Limit-Remaining"), \
                response.headers.get("X-Rate-Limit-Reset")

        def switch(**policy) -> httpx.Response:
            return http.put("/_sandbox/rate-limit", json={"limit": 3, "window_seconds": 60, **policy})

        assert switch(mode="token_bucket").json()["mode"] == "token_bucket"
        assert http.get("/_sandbox/rate-limit").json()["mode"] == "token_bucket"
        assert [limited(1000) for _ in range(4)] == [
            (200, "2", "20"), (200, "1", "40"), (200, "0", "60"), (429, "0", None),
        ]
        assert limited(1020) == (200, "0", "60")

        assert switch(mode="sliding").status_code == 200  # a new mode starts from an empty count
        assert [limited(t) for t in (2000, 2030, 2040, 2050)] == [
            (200, "2", "60"), (200, "1", "30"), (200, "0", "20"), (429, "0", None),
        ]
        assert limited(2060) == (200, "0", "30")

        rejected = switch(mode="leaky")
        assert rejected.status_code == 400 and "leaky" in rejected.json()["error"]
        assert http.get("/_sandbox/rate-limit").json()["mode"] == "sliding"  # unchanged

        assert switch(mode="fixed").status_code == 200
        assert [limited(t) for t in (3000, 3030, 3040, 3050)] == [
            (200, "2", "60"), (200, "1", "30"), (200, "0", "20"), (429, "0", None),
        ]
        assert limited(3060) == (200, "2", "60")
    assert sandbox.stats.too_many_requests == 3
