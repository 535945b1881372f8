"""The connector kit: throttle (on a fake clock against simulated servers), paging, gather_all, the
HTTP client (against an in-process fake server) and the auth providers."""

import asyncio
import base64
import json
import multiprocessing
import threading
import types
import uuid
from decimal import Decimal
from urllib.parse import parse_qs

import httpx
import pytest
from kit_support import (
    MODES,
    TRIPLETEX_HEADERS,
    FakeClock,
    FakeServer,
    json_reply,
    refresh_in_child,
    rotating_token_endpoint,
    simulate,
)

from erp_pipelines.erps.kit import (
    ApiClient,
    ClientCredentials,
    Cursor,
    MintedToken,
    Offset,
    PageNumber,
    RateLimit,
    RefreshingToken,
    Reply,
    RetryPolicy,
    StaticToken,
    Throttle,
    Token,
    gather_all,
    read_all,
    refused_by_token_endpoint,
)
from erp_pipelines.erps.kit import auth as auth_module
from erp_pipelines.errors import AuthError, BadResponse, ErpError, RateLimited, UpstreamError, redact
from erp_pipelines.sandbox.common import serve
from erp_pipelines.tokens import TokenStore

TENANT = "Fjordkraft Regnskap AS (orgnr 912345679)"
SECONDS = 30.0

# ---------------------------------------------------------------------------------------- throttle


@pytest.mark.parametrize("mode", MODES)
def test_published_limit_with_one_in_flight_is_never_exceeded_and_used(mode):
    """Fiken: 4 requests/s, one in flight."""
    clock = FakeClock()
    throttle = Throttle(RateLimit(requests_per_second=4, max_in_flight=1), clock=clock, sleep=clock.sleep)
    run = simulate(throttle, clock, mode=mode, limit=4, seconds=SECONDS, server_in_flight=1)
    assert run.peak_in_flight == 1 and throttle.peak_in_flight == 1
    assert run.most_in_any_second() <= 4
    assert run.rate_limited() == 0
    assert run.ok_within(SECONDS) / (4 * SECONDS) >= 0.9


@pytest.mark.parametrize("latency", [0.05, 0.5])
@pytest.mark.parametrize("mode", MODES)
def test_published_rate_without_in_flight_cap_is_used_without_429s(mode, latency):
    """PowerOffice: 10 requests/s; at 0.5 s latency it takes ~5 in flight to reach the rate."""
    clock = FakeClock()
    throttle = Throttle(RateLimit(requests_per_second=10), clock=clock, sleep=clock.sleep)
    run = simulate(throttle, clock, mode=mode, limit=10, seconds=SECONDS, latency=latency)
    assert run.rate_limited() == 0
    assert run.most_in_any_second() <= 10
    assert run.ok_within(SECONDS) / (10 * SECONDS) >= 0.9


@pytest.mark.parametrize("mode", MODES)
def test_limit_learned_from_rate_limit_headers_is_used_with_at_most_one_percent_429s(mode):
    """Tripletex: nothing published; the headers report limit, remaining and reset."""
    clock = FakeClock()
    throttle = Throttle(RateLimit(headers=TRIPLETEX_HEADERS), clock=clock, sleep=clock.sleep)
    run = simulate(throttle, clock, mode=mode, limit=10, seconds=SECONDS, report_headers=True)
    after_first = run.first_answer()
    assert run.rate_limited(after=after_first) <= 0.01 * run.sent(after=after_first)
    assert run.ok_within(SECONDS) / (10 * SECONDS) >= 0.9
    assert throttle.allowed_rate() == 10
    assert throttle.ceiling == pytest.approx(10 * Throttle.HEADROOM)


async def sent_ticket(throttle):
    """One request's turn, taken and given back (the request is then 'out')."""
    async with throttle.slot() as ticket:
        return ticket


def test_a_429_halves_the_rate_once_per_incident_pauses_for_retry_after_and_recovers():
    clock = FakeClock()
    throttle = Throttle(RateLimit(requests_per_second=10), clock=clock, sleep=clock.sleep)
    assert throttle.rate == throttle.ceiling == pytest.approx(10 * Throttle.HEADROOM)

    async def incident():
        out = [await sent_ticket(throttle) for _ in range(3)]
        pauses = [throttle.on_rate_limited(ticket, httpx.Headers({"Retry-After": "2"})) for ticket in out]
        hit_at = clock.now
        after = await sent_ticket(throttle)
        return pauses, hit_at, after

    pauses, hit_at, after = clock.run(incident())
    assert pauses == [2.0, 2.0, 2.0]
    assert throttle.rate == pytest.approx(10 * Throttle.HEADROOM / 2)  # three 429s of one incident: one cut
    assert after.sent == pytest.approx(hit_at + 2.0)  # nothing was sent during Retry-After

    simulate(throttle, clock, mode="sliding", limit=10, seconds=4.0)
    assert 10 * Throttle.HEADROOM / 2 < throttle.rate < 10 * Throttle.HEADROOM  # climbing back
    simulate(throttle, clock, mode="sliding", limit=10, seconds=10.0)
    assert throttle.rate == pytest.approx(10 * Throttle.HEADROOM)  # back at the ceiling within RECOVERY_SECONDS

    async def second_incident():
        throttle.on_rate_limited(await sent_ticket(throttle), httpx.Headers({"Retry-After": "1"}))

    clock.run(second_incident())
    assert throttle.rate == pytest.approx(10 * Throttle.HEADROOM / 2)  # a request sent after the cut is a new incident


def test_a_429_without_retry_after_pauses_until_the_reset_header():
    clock = FakeClock()
    throttle = Throttle(RateLimit(requests_per_second=10, headers=TRIPLETEX_HEADERS), clock=clock, sleep=clock.sleep)

    async def incident():
        pause = throttle.on_rate_limited(await sent_ticket(throttle), httpx.Headers({"X-Rate-Limit-Reset": "3"}))
        hit_at = clock.now
        retry_after_wins = throttle.on_rate_limited(
            await sent_ticket(throttle), httpx.Headers({"X-Rate-Limit-Reset": "3", "Retry-After": "1"}))
        return pause, hit_at, retry_after_wins, await sent_ticket(throttle)

    pause, hit_at, retry_after_wins, after = clock.run(incident())
    assert pause == 3.0 and retry_after_wins == 1.0
    assert after.sent == pytest.approx(hit_at + 3.0 + 1.0)
    assert throttle.rate == pytest.approx(10 * Throttle.HEADROOM / 4)  # two incidents: the second was sent after the first cut


def test_shared_throttle_is_one_per_credential_and_caps_in_flight_across_event_loops():
    key = f"test-kit:{uuid.uuid4()}"
    limit = RateLimit(requests_per_second=1000, max_in_flight=1)
    throttle = Throttle.shared(key, limit)
    try:
        assert Throttle.shared(key, RateLimit(requests_per_second=1)) is throttle
        assert Throttle.shared(key + "-other", limit) is not throttle
        out, peak, done, lock = 0, 0, [], threading.Lock()

        async def requests(count):
            nonlocal out, peak
            for _ in range(count):
                async with Throttle.shared(key, limit).slot():
                    with lock:
                        out += 1
                        peak = max(peak, out)
                    await asyncio.sleep(0.002)
                    with lock:
                        out -= 1
                    done.append(1)

        threads = [threading.Thread(target=asyncio.run, args=(requests(20),)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(done) == 40 and peak == 1 and throttle.peak_in_flight == 1 and throttle.in_flight == 0
    finally:
        Throttle._registry.pop(key, None)
        Throttle._registry.pop(key + "-other", None)


# ---------------------------------------------------------------------------------------- paging

ROWS = [{"id": i} for i in range(10)]


class FakeList:
    """A paged list endpoint for `read_all`: `answer(params, call_number)` gives the Reply; every
    request's parameters are kept."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    async def __call__(self, params):
        self.calls.append(params)
        return self.answer(params, len(self.calls))


def read(fetch, style, **kwargs):
    return asyncio.run(read_all(fetch, style, identity=lambda row: row["id"], where="GET /ledger/account",
                                erp="testerp", tenant=TENANT, **kwargs))


def offset_list(rows_at, version_at):
    """Offset pages of `rows_at(call)` with `versionDigest` `version_at(call)`."""
    return FakeList(lambda p, n: Reply(200, httpx.Headers(), {
        "values": rows_at(n)[p["from"]:p["from"] + p["count"]], "versionDigest": version_at(n)}))


def test_offset_reads_every_page_with_the_callers_parameters():
    fetch = offset_list(lambda n: ROWS, lambda n: "v1")
    assert read(fetch, Offset(4, version_key="versionDigest"), params={"dateFrom": "2026-01-01"}) == ROWS
    assert fetch.calls == [{"dateFrom": "2026-01-01", "from": f, "count": 4} for f in (0, 4, 8)]


def test_offset_list_version_changing_mid_read_reads_the_list_again():
    inserted = [{"id": 99}, *ROWS]
    fetch = offset_list(lambda n: ROWS if n == 1 else inserted, lambda n: "v1" if n == 1 else "v2")
    assert read(fetch, Offset(4, version_key="versionDigest")) == inserted
    assert [c["from"] for c in fetch.calls] == [0, 4, 0, 4, 8]


def test_list_that_never_stops_changing_fails_after_max_reads_naming_the_tenant():
    fetch = offset_list(lambda n: ROWS, lambda n: f"v{n}")
    with pytest.raises(UpstreamError) as raised:
        read(fetch, Offset(4, version_key="versionDigest"), max_reads=3)
    assert len(fetch.calls) == 6
    assert TENANT in str(raised.value) and "retry the partition later" in str(raised.value)
    assert "3 reads in a row" in str(raised.value)


def test_a_repeated_key_under_a_stable_version_reads_again_and_then_fails():
    repeated = [*ROWS[:4], ROWS[3], *ROWS[4:]]  # row 3 shows up on page 1 and page 2
    once = offset_list(lambda n: repeated if n <= 2 else ROWS, lambda n: "v1")
    assert read(once, Offset(4, version_key="versionDigest")) == ROWS
    assert [c["from"] for c in once.calls] == [0, 4, 0, 4, 8]

    always = offset_list(lambda n: repeated, lambda n: "v1")
    with pytest.raises(BadResponse, match="lists 3 more than once, 3 reads in a row") as raised:
        read(always, Offset(4, version_key="versionDigest"))
    assert TENANT in str(raised.value)


def numbered_list(style, rows, *, cap=None, headers=lambda number, pages, total, call: {}):
    """Page-number pages of `style` over `rows`; the server gives at most `cap` rows a page; an empty
    page is a 204; `headers(number, pages, total, call)` are the page's headers."""

    def answer(params, call):
        size = min(params[style.size_param], cap or len(rows))
        number = params[style.page_param] - style.first_page
        page = rows[number * size:(number + 1) * size]
        pages = -(-len(rows) // size)
        return Reply(200 if page else 204, httpx.Headers(headers(number, pages, len(rows), call)), page or None)

    return FakeList(answer)


def page_numbers(fetch, style):
    return [c[style.page_param] for c in fetch.calls]


def test_page_number_ends_by_the_page_count_header_even_when_the_server_caps_the_page_size():
    fiken = PageNumber(4, page_count_header="Fiken-Api-Page-Count", total_header="Fiken-Api-Result-Count")

    def counted(number, pages, total, call):
        return {"Fiken-Api-Page-Count": str(pages), "Fiken-Api-Result-Count": str(total)}

    exact = numbered_list(fiken, ROWS[:8], headers=counted)  # two full pages: no third request
    assert read(exact, fiken) == ROWS[:8] and page_numbers(exact, fiken) == [0, 1]
    capped = numbered_list(fiken, ROWS, cap=3, headers=counted)  # asks 4, gets 3: every page is "short"
    assert read(capped, fiken) == ROWS and page_numbers(capped, fiken) == [0, 1, 2, 3]


def test_page_number_ends_by_x_pagination_without_next_page_link():
    poweroffice = PageNumber(4, page_param="PageNumber", size_param="PageSize", first_page=1,
                             pagination_header="X-Pagination")

    def pagination(number, pages, total, call):
        link = f"/Vouchers?PageNumber={number + 2}&PageSize=4" if number + 1 < pages else None
        return {"X-Pagination": json.dumps({"totalCount": total, "nextPageLink": link})}

    fetch = numbered_list(poweroffice, ROWS[:8], headers=pagination)
    assert read(fetch, poweroffice) == ROWS[:8] and page_numbers(fetch, poweroffice) == [1, 2]


def test_page_number_ends_by_a_204_or_by_a_short_page():
    style = PageNumber(4, first_page=1)
    by_204 = numbered_list(style, ROWS[:8])
    assert read(by_204, style) == ROWS[:8] and page_numbers(by_204, style) == [1, 2, 3]
    by_short_page = numbered_list(style, ROWS)
    assert read(by_short_page, style) == ROWS and page_numbers(by_short_page, style) == [1, 2, 3]


def test_page_number_total_count_changing_mid_read_reads_the_list_again():
    fiken = PageNumber(4, page_count_header="Fiken-Api-Page-Count", total_header="Fiken-Api-Result-Count")
    fetch = numbered_list(fiken, ROWS, headers=lambda number, pages, total, call: {
        "Fiken-Api-Page-Count": str(pages), "Fiken-Api-Result-Count": str(total + (call > 1))})
    assert read(fetch, fiken) == ROWS and page_numbers(fetch, fiken) == [0, 1, 0, 1, 2]


@pytest.mark.parametrize("rows", ["edges", "items"])
def test_cursor_reads_relay_connections_until_has_next_page_is_false(rows):
    def answer(params, call):
        start = int(params["after"] or 0)
        page = ROWS[start:start + params["first"]]
        end = start + len(page)
        connection = {
            rows: [{"node": row} for row in page] if rows == "edges" else page,
            "pageInfo": {"hasNextPage": end < len(ROWS), "endCursor": str(end)},
        }
        return Reply(200, httpx.Headers(), {"data": {"accounts": connection}})

    fetch = FakeList(answer)
    assert read(fetch, Cursor(4, "data.accounts", rows=rows)) == ROWS
    assert fetch.calls == [{"first": 4, "after": a} for a in (None, "4", "8")]


def test_cursor_total_count_changing_mid_read_reads_the_list_again():
    def answer(params, call):
        start = int(params["after"] or 0)
        page = ROWS[start:start + params["first"]]
        end = start + len(page)
        connection = {"items": page, "totalCount": len(ROWS) + (call == 1),  # the first page saw one row more
                      "pageInfo": {"hasNextPage": end < len(ROWS), "endCursor": str(end)}}
        return Reply(200, httpx.Headers(), {"data": {"accounts": connection}})

    fetch = FakeList(answer)
    assert read(fetch, Cursor(4, "data.accounts", rows="items", version_key="totalCount")) == ROWS
    assert [call["after"] for call in fetch.calls] == [None, "4", None, "4", "8"]


# ---------------------------------------------------------------------------------------- gather_all


def test_gather_all_returns_results_in_order_and_the_first_failure_cancels_the_others():
    cancelled = []

    async def slow(name):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    async def failing():
        await asyncio.sleep(0.01)
        raise BadResponse("tenant 2 failed")

    async def value(v):
        await asyncio.sleep(0)
        return v

    clock = FakeClock()
    assert clock.run(gather_all(value(1), value(2), value(3))) == [1, 2, 3]
    with pytest.raises(BadResponse, match="tenant 2 failed"):
        clock.run(gather_all(slow("a"), failing(), slow("b")))
    assert sorted(cancelled) == ["a", "b"]
    assert clock.now < 1000 + 3600  # nobody waited for the slow ones


# ---------------------------------------------------------------------------------------- ApiClient


@pytest.fixture
def clock():
    return FakeClock()


def api_client(server, clock, *, max_attempts=5, **kwargs):
    throttle = Throttle(RateLimit(requests_per_second=1000), clock=clock, sleep=clock.sleep)
    return ApiClient(erp="testerp", base_url="https://api.example.test/v2", throttle=throttle,
                     retry=RetryPolicy(max_attempts=max_attempts, backoff_base=0), transport=server.transport,
                     **kwargs)


def call(clock, coroutine_function, *args, **kwargs):
    """Run `await coroutine_function(*args, **kwargs)` on the fake clock; returns the result or the error."""

    async def main():
        try:
            return await coroutine_function(*args, **kwargs)
        except ErpError as error:
            return error

    return clock.run(main())


def test_a_5xx_is_retried_and_counted(clock):
    server = FakeServer(httpx.Response(503), json_reply({"amount": 1234.50}))
    client = api_client(server, clock)
    assert call(clock, client.get_json, "/ledger", tenant=TENANT) == {"amount": Decimal("1234.5")}
    assert client.stats.retries == 1 and client.stats.requests == 2
    assert dict(client.stats.by_status) == {503: 1, 200: 1}


def test_5xx_429_dropped_connections_and_malformed_json_share_one_attempt_budget(clock):
    server = FakeServer(httpx.Response(500), httpx.Response(429), httpx.ConnectError("refused"),
                        httpx.Response(200, content=b'{"values": ['), json_reply({"never": "reached"}),
                        clock=clock)
    client = api_client(server, clock, max_attempts=4)
    error = call(clock, client.get_json, "/ledger", tenant=TENANT)
    assert isinstance(error, BadResponse) and "malformed JSON" in str(error)
    assert error.attempts == 4 and len(server.requests) == 4
    assert TENANT in str(error)
    assert (client.stats.retries, client.stats.rate_limited, client.stats.transport_errors) == (3, 1, 1)
    assert server.times[2] - server.times[1] >= 1.0  # the 429 paused the credential (back-off, no headers)


class CountingToken(MintedToken):
    async def mint(self):
        return Token(f"minted-token-{self.minted + 1}-0f3c9a")


def bearer(request):
    return request.headers.get("Authorization")


def test_a_401_re_mints_the_token_once_and_retries(clock):
    server = FakeServer(httpx.Response(401), json_reply({"ok": True}))
    provider = CountingToken()
    client = api_client(server, clock)
    assert call(clock, client.get_json, "/ledger", auth=provider, tenant=TENANT) == {"ok": True}
    assert provider.minted == 2
    assert [bearer(r) for r in server.requests] == ["Bearer minted-token-1-0f3c9a", "Bearer minted-token-2-0f3c9a"]
    assert client.stats.retries == 0  # a re-mint is not a failure
    assert redact("echo minted-token-2-0f3c9a") == "echo [redacted]"


def test_a_second_401_goes_to_the_error_mapper_with_the_tenant(clock):
    seen = []

    def map_error(response, body, context):
        seen.append((response.status_code, body, context))
        return AuthError("the key was refused", erp="testerp", fix="renew the key")

    server = FakeServer(json_reply({"message": "unauthorized"}, status=401))
    provider = CountingToken()
    client = api_client(server, clock, map_error=map_error)
    error = call(clock, client.get_json, "/ledger", auth=provider, tenant=TENANT)
    assert isinstance(error, AuthError) and TENANT in str(error) and error.attempts == 2
    assert provider.minted == 2 and len(server.requests) == 2
    [(status, body, context)] = seen
    assert (status, body, context.method, context.path, context.tenant) == (
        401, {"message": "unauthorized"}, "GET", "/ledger", TENANT)


def test_a_static_token_is_not_re_minted_after_a_401(clock):
    server = FakeServer(httpx.Response(401))
    client = api_client(server, clock)
    error = call(clock, client.get_json, "/ledger", auth=StaticToken("static-api-key-5e1d", scheme="token"),
                 tenant=TENANT)
    assert isinstance(error, BadResponse) and "HTTP 401" in str(error) and error.attempts == 1
    assert [bearer(r) for r in server.requests] == ["token static-api-key-5e1d"]
    assert "static-api-key-5e1d" not in str(error) and redact("static-api-key-5e1d") == "[redacted]"


def test_a_throttling_code_in_the_body_pauses_the_credential_and_is_retried(clock):
    verdicts = [RateLimited("throttled by body", retry_after=2), None]
    server = FakeServer(json_reply({"errors": [{"code": "THROTTLED"}]}), json_reply({"data": 1}), clock=clock)
    client = api_client(server, clock, check_body=lambda response, body, context: verdicts.pop(0))
    assert call(clock, client.get_json, "/graphql") == {"data": 1}
    assert server.times[1] - server.times[0] == pytest.approx(2.0, abs=0.01)
    assert (client.stats.rate_limited, client.stats.retries) == (1, 1)


def test_a_non_retryable_error_from_the_body_check_is_raised_at_once(clock):
    server = FakeServer(json_reply({"errors": [{"message": "no such field"}]}))
    client = api_client(server, clock, check_body=lambda response, body, context: BadResponse(
        f"GraphQL: {body['errors'][0]['message']}", erp="testerp"))
    error = call(clock, client.get_json, "/graphql", tenant=TENANT)
    assert isinstance(error, BadResponse) and "no such field" in str(error) and TENANT in str(error)
    assert error.attempts == 1 and len(server.requests) == 1


def test_a_204_decodes_to_none_and_reply_keeps_status_headers_and_body(clock):
    server = FakeServer(httpx.Response(204),
                        json_reply([{"amount": 0.10}], headers={"Fiken-Api-Page-Count": "3"}))
    client = api_client(server, clock)
    assert call(clock, client.get_json, "/empty") is None
    reply = call(clock, client.reply, "GET", "/accounts", params={"page": 0})
    assert (reply.status_code, reply.headers["Fiken-Api-Page-Count"], reply.body) == (
        200, "3", [{"amount": Decimal("0.10")}])
    assert str(server.requests[1].url) == "https://api.example.test/v2/accounts?page=0"


def test_an_absolute_url_reaches_another_host(clock):
    server = FakeServer(json_reply({"access_token": "x"}), json_reply([]))
    client = api_client(server, clock)
    call(clock, client.request, "POST", "https://auth.example.test/oauth/token", form={"a": "b"}, decode=True)
    call(clock, client.get_json, "/accounts")
    assert [str(r.url) for r in server.requests] == [
        "https://auth.example.test/oauth/token", "https://api.example.test/v2/accounts"]


# ---------------------------------------------------------------------------------------- auth providers

TOKEN_URL = "https://auth.example.test/oauth/token"
CLIENT_SECRET = "client-secret-7d2e41"
NOW = 1_800_000_000.0


@pytest.fixture
def wall_clock(monkeypatch):
    """The auth module's epoch time, moved by hand."""
    wall = types.SimpleNamespace(now=NOW)
    monkeypatch.setattr(auth_module, "time", types.SimpleNamespace(time=lambda: wall.now))
    return wall


@pytest.fixture
def store(tmp_path):
    return TokenStore(tmp_path / "tokens.enc", key=TokenStore.generate_key())


def form_of(request):
    return {k: v[0] for k, v in parse_qs(request.content.decode()).items()}


def basic_of(request):
    scheme, _, value = request.headers["Authorization"].partition(" ")
    return scheme, base64.b64decode(value).decode()


def refused():
    return refused_by_token_endpoint("testerp", "check the client id and secret", tenant=TENANT)


def test_client_credentials_mints_caches_until_expiry_less_leeway_and_reuses_the_store(clock, store, wall_clock):
    def token_endpoint(request):
        assert form_of(request) == {"grant_type": "client_credentials"}
        assert basic_of(request) == ("Basic", f"client-id:{CLIENT_SECRET}")
        assert request.headers["Ocp-Apim-Subscription-Key"] == "subscription-key-1"
        return json_reply({"access_token": f"cc-access-token-{len(server.requests)}", "expires_in": 3600})

    server = FakeServer(token_endpoint)
    client = api_client(server, clock)

    def provider():
        return ClientCredentials(client, TOKEN_URL, "client-id", CLIENT_SECRET, refused=refused(),
                                 headers={"Ocp-Apim-Subscription-Key": "subscription-key-1"},
                                 store=store, store_entry="testerp:client")

    first = provider()
    assert call(clock, first.token) == "cc-access-token-1"
    wall_clock.now += 3600 - first.leeway - 1
    assert call(clock, first.token) == "cc-access-token-1" and len(server.requests) == 1
    again = provider()  # another run: the token comes from the store
    assert call(clock, again.token) == "cc-access-token-1" and again.minted == 0 and len(server.requests) == 1
    wall_clock.now += 1
    assert call(clock, first.token) == "cc-access-token-2" and first.minted == 2
    assert store.get("testerp:client") == {"value": "cc-access-token-2", "expires_at": NOW + 3600 - 60 + 3600,
                                           "refresh_token": None}
    assert redact(f"{CLIENT_SECRET} cc-access-token-1 cc-access-token-2") == "[redacted] [redacted] [redacted]"


def test_a_refused_client_credential_is_the_connectors_error(clock):
    server = FakeServer(json_reply({"error": "invalid_client"}, status=400))
    provider = ClientCredentials(api_client(server, clock), TOKEN_URL, "client-id", CLIENT_SECRET, refused=refused())
    error = call(clock, provider.token)
    assert isinstance(error, AuthError) and error.attempts == 1 and len(server.requests) == 1
    assert str(error) == (f"[testerp] {TENANT}: the token endpoint refused the credential (HTTP 400, invalid_client) "
                          "Fix: check the client id and secret")


def consent_missing():
    return AuthError("no consent is stored", erp="testerp", fix="run erp-pipelines consent testerp")


def refreshing(client, store):
    return RefreshingToken(client, TOKEN_URL, "client-id", CLIENT_SECRET, refused=refused(),
                           missing=consent_missing, store=store, store_entry="testerp:consent")


def test_an_expired_access_token_is_refreshed_and_the_rotated_refresh_token_stored_before_use(
        clock, store, wall_clock):
    store.put("testerp:consent", {"value": "old-access-token-1", "expires_at": NOW - 10,
                                  "refresh_token": "refresh-token-1-a9b8"})

    def token_endpoint(request):
        assert form_of(request) == {"grant_type": "refresh_token", "refresh_token": "refresh-token-1-a9b8"}
        assert basic_of(request) == ("Basic", f"client-id:{CLIENT_SECRET}")
        return json_reply({"access_token": "new-access-token-2", "expires_in": 3600,
                           "refresh_token": "refresh-token-2-c7d6"})

    server = FakeServer(token_endpoint)
    provider = refreshing(api_client(server, clock), store)

    async def token_then_store():
        return await provider.token(), store.get("testerp:consent")  # read as soon as the token is returned

    token, stored = clock.run(token_then_store())
    assert token == "new-access-token-2" and provider.minted == 1
    assert stored == {"value": "new-access-token-2", "expires_at": NOW + 3600, "refresh_token": "refresh-token-2-c7d6"}
    assert call(clock, provider.token) == "new-access-token-2" and len(server.requests) == 1
    assert redact("old-access-token-1 refresh-token-1-a9b8 new-access-token-2 refresh-token-2-c7d6") == \
        "[redacted] [redacted] [redacted] [redacted]"


def test_a_fresh_stored_access_token_is_used_and_a_missing_consent_says_how_to_give_it(clock, store, wall_clock):
    server = FakeServer(json_reply({"error": "invalid_grant"}, status=400))
    provider = refreshing(api_client(server, clock), store)
    error = call(clock, provider.token)
    assert isinstance(error, AuthError) and "run erp-pipelines consent testerp" in str(error)
    store.put("testerp:consent", {"value": "stored-access-token-3", "expires_at": NOW + 3600,
                                  "refresh_token": "refresh-token-3-e5f4"})
    assert call(clock, provider.token) == "stored-access-token-3" and provider.minted == 0
    assert server.requests == []
    assert redact("stored-access-token-3") == "[redacted]"


def test_two_processes_refreshing_one_consent_refresh_it_once(tmp_path):
    key, entry = TokenStore.generate_key(), "testerp:consent"
    store = TokenStore(tmp_path / "tokens.enc", key=key)
    store.put(entry, {"value": "expired-access-token", "expires_at": 0, "refresh_token": "first-refresh-token"})
    app, issued = rotating_token_endpoint("first-refresh-token", delay=0.3)
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    with serve(app) as url:
        children = [context.Process(target=refresh_in_child, args=(url, str(store.path), key, entry, barrier, results))
                    for _ in range(2)]
        for child in children:
            child.start()
        tokens = [results.get(timeout=120) for _ in children]
        for child in children:
            child.join(timeout=30)
    assert tokens == [issued["access_token"]] * 2
    assert issued["refreshes"] == 1 and issued["refused"] == 0
    assert store.get(entry)["refresh_token"] == issued["refresh_token"] == "rotated-refresh-token-1"
