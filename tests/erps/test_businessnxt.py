"""Visma Business NXT: every query valid against the SDL, the token as documented, cursor paging,
balances from grouped postings, partial data refused, the HTML 401 and the companies it refuses."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from urllib.parse import parse_qsl

import httpx
import pytest

from erp_pipelines.config import connector_kwargs
from erp_pipelines.erps.businessnxt import (
    COMPANY_ACCESS_FIX,
    SCOPE,
    SERVICE_USER_FIX,
    BusinessNxtConnector,
    fiscal_year_start,
    queries,
)
from erp_pipelines.errors import AuthError, BadResponse, ClientAccessError
from erp_pipelines.model import months_between
from erp_pipelines.registry import ERPS
from erp_pipelines.sandbox.businessnxt import CUSTOMER_TENANT_ID, BusinessNxtSandbox, company_no_of
from erp_pipelines.sandbox.ledger import generate_ledger

MONTHS = months_between(dt.date(2025, 12, 1), dt.date(2026, 2, 1))  # across a year end
BASE = "http://bnxt.test/api/graphql-service"


class Recorder(httpx.AsyncBaseTransport):
    """The sandbox app in-process; every request recorded; `answer` may replace the sandbox's reply."""

    def __init__(self, app, answer=None) -> None:
        self.inner, self.answer, self.requests = httpx.ASGITransport(app=app), answer, []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        replaced = self.answer(request) if self.answer else None
        return replaced if replaced is not None else await self.inner.handle_async_request(request)


@pytest.fixture
def sandbox():
    return BusinessNxtSandbox(generate_ledger(3, first_month=dt.date(2025, 6, 1), last_month=MONTHS[-1]))


def run(sandbox, scenario, *, answer=None, page_size=None, **env_changes):
    transport = Recorder(sandbox.app, answer)
    env = {**sandbox.environment(BASE), **env_changes}

    async def go():
        connector = BusinessNxtConnector(**connector_kwargs(ERPS["businessnxt"], env), transport=transport,
                                         page_size=page_size)
        async with connector:
            return await scenario(connector)

    return asyncio.run(go()), transport


async def listed(connector):
    return {c.org_number: c for c in await connector.list_clients()}


def exact(tenant, balances, months=MONTHS):
    key = lambda b: (b.period, b.account_number)
    return sorted((b for b in balances if not b.is_zero), key=key) == sorted(tenant.expected_balances(months), key=key)


def graphql_bodies(transport):
    return [json.loads(r.content) for r in transport.requests if r.url.path.startswith("/api/graphql-service")]


# ---------------------------------------------------------------------------------------- queries


def test_every_query_file_is_valid_against_the_sdl():
    book = queries()
    assert set(book.queries) == {"available_companies", "company_identity", "general_ledger_accounts", "ledger_sums"}
    assert book.problems() == {}
    assert book.problems("query { useCompany(no: 1) { generalLedgerAccount { items { noSuchColumn } } } }")["query"]


def test_every_request_sent_is_a_book_query_valid_against_the_sdl(sandbox):
    async def scenario(connector):
        clients = await listed(connector)
        client = next(iter(clients.values()))
        await connector.fetch_accounts(client)
        await connector.fetch_balances(client, MONTHS)
        await connector.verify_tenant(client)

    _, transport = run(sandbox, scenario)
    bodies = graphql_bodies(transport)
    book = queries()
    assert {book.name_of(body["query"]) for body in bodies} == set(book.queries)
    for body in bodies:
        assert book.problems(body["query"]) == {"query": []}
        assert set(body) == {"query", "variables"}
    assert all(r.method == "POST" and r.headers["content-type"] == "application/json"
               for r in transport.requests if r.url.path.startswith("/api/graphql-service"))


# ---------------------------------------------------------------------------------------- auth


def test_one_client_credentials_token_with_the_service_scope(sandbox):
    async def scenario(connector):
        clients = await listed(connector)
        for client in clients.values():
            await connector.fetch_accounts(client)

    _, transport = run(sandbox, scenario)
    token_calls = [r for r in transport.requests if r.url.path == "/connect/token"]
    assert len(token_calls) == 1  # one token for every company of the customer
    form = dict(parse_qsl(token_calls[0].content.decode()))
    assert form == {"grant_type": "client_credentials", "client_id": sandbox.client_id,
                    "client_secret": sandbox.client_secret, "scope": SCOPE, "tenant_id": CUSTOMER_TENANT_ID}
    api_calls = [r for r in transport.requests if r.url.path.startswith("/api/")]
    assert {r.url.path for r in api_calls} == {"/api/graphql-service"}  # the service endpoint, no slash
    assert all(r.headers["authorization"].startswith("Bearer ") for r in api_calls)


def test_without_a_tenant_id_the_token_request_leaves_it_out(sandbox):
    _, transport = run(sandbox, listed, BUSINESSNXT_TENANT_ID="")
    form = dict(parse_qsl(next(r for r in transport.requests if r.url.path == "/connect/token").content.decode()))
    assert "tenant_id" not in form


def test_an_html_401_is_an_auth_error_naming_the_service_user_fix(sandbox):
    sandbox.service_user_registered = False
    with pytest.raises(AuthError) as caught:
        run(sandbox, listed)
    message = str(caught.value)
    assert "HTTP 401 (an HTML page)" in message and SERVICE_USER_FIX in message
    assert sandbox.tokens_minted == 2  # the first 401 re-minted the token once, the second is final


def test_an_expired_token_answered_by_html_401_is_reminted(sandbox):
    tenant = sandbox.ledger.valid_tenants[0]

    async def scenario(connector):
        clients = await listed(connector)
        sandbox.expire_tokens()
        return await connector.fetch_balances(clients[tenant.org_number], MONTHS)

    balances, _ = run(sandbox, scenario)
    assert exact(tenant, balances) and sandbox.tokens_minted == 2


def test_a_tenant_answered_by_html_401_fails_alone_with_the_fix(sandbox):
    refused, kept = sandbox.ledger.valid_tenants[:2]
    refused_no = company_no_of(refused)

    def answer(request):
        if request.url.path == "/api/graphql-service" and json.loads(request.content)["variables"].get("companyNo") \
                == refused_no and "ledger_sums" == queries().name_of(json.loads(request.content)["query"]):
            return httpx.Response(401, text="<html><title>401 Authorization Required</title></html>",
                                  headers={"content-type": "text/html"})
        return None

    async def scenario(connector):
        clients = await listed(connector)
        with pytest.raises(ClientAccessError) as caught:
            await connector.fetch_balances(clients[refused.org_number], MONTHS)
        return caught.value, await connector.fetch_balances(clients[kept.org_number], MONTHS)

    (error, balances), _ = run(sandbox, scenario, answer=answer)
    assert refused.name in str(error) and COMPANY_ACCESS_FIX in str(error)
    assert exact(kept, balances)


def test_a_company_without_access_is_left_out_and_one_revoked_mid_run_fails_alone(sandbox):
    gone, kept, later = sandbox.ledger.valid_tenants[:3]
    sandbox.revoke(gone)

    async def scenario(connector):
        clients = await listed(connector)
        sandbox.revoke(later)
        with pytest.raises(ClientAccessError) as caught:
            await connector.fetch_accounts(clients[later.org_number])
        return clients, caught.value, await connector.fetch_balances(clients[kept.org_number], MONTHS)

    (clients, error, balances), _ = run(sandbox, scenario)
    assert gone.org_number not in clients and kept.org_number in clients
    assert later.name in str(error) and "registered in Business NXT with access to the company" in str(error)
    assert exact(kept, balances)


def test_a_company_whose_ledger_rights_were_withdrawn_fails_alone_with_its_fix(sandbox):
    denied, kept = sandbox.ledger.valid_tenants[:2]
    sandbox.deny_access(denied)

    async def scenario(connector):
        clients = await listed(connector)  # still listed and describable
        with pytest.raises(ClientAccessError) as caught:
            await connector.fetch_balances(clients[denied.org_number], MONTHS)
        return caught.value, await connector.fetch_balances(clients[kept.org_number], MONTHS)

    (error, balances), _ = run(sandbox, scenario)
    assert denied.name in str(error) and "read access to the general ledger" in str(error)
    assert exact(kept, balances)


# ---------------------------------------------------------------------------------------- GraphQL errors


def graphql_answer(document):
    def answer(request):
        if request.url.path == "/api/graphql-service" and "generalLedgerTransaction" in json.loads(request.content)["query"]:
            return httpx.Response(200, json=document)
        return None

    return answer


def test_partial_data_with_errors_is_refused_whole(sandbox):
    partial = {"data": {"useCompany": {"generalLedgerTransaction": {"items": [
        {"accountNo": 1920, "aggregates": {"sum": {"postedAmountDomestic": 100}}}]}}},
        "errors": [{"message": "Timeout while reading some rows", "path": ["useCompany", "generalLedgerTransaction"]}]}

    async def scenario(connector):
        clients = await listed(connector)
        return await connector.fetch_balances(next(iter(clients.values())), MONTHS)

    with pytest.raises(BadResponse) as caught:
        run(sandbox, scenario, answer=graphql_answer(partial))
    assert "partial data is refused" in str(caught.value) and "Timeout while reading" in str(caught.value)


def test_errors_without_data_are_a_bad_response_and_throttling_is_retried(sandbox):
    async def scenario(connector):
        clients = await listed(connector)
        return await connector.fetch_balances(next(iter(clients.values())), MONTHS)

    with pytest.raises(BadResponse) as caught:
        run(sandbox, scenario, answer=graphql_answer({"errors": [{"message": "Syntax Error: Expected Name"}]}))
    assert "Syntax Error" in str(caught.value)

    throttled = {"count": 0}

    def answer(request):
        if request.url.path == "/api/graphql-service" and "generalLedgerTransaction" in request.content.decode() \
                and throttled["count"] < 1:
            throttled["count"] += 1
            return httpx.Response(200, json={"errors": [{"message": "Too many requests for this company"}]})
        return None

    tenant = sandbox.ledger.valid_tenants[0]

    async def first(connector):
        return await connector.fetch_balances((await listed(connector))[tenant.org_number], MONTHS)

    balances, _ = run(sandbox, first, answer=answer)
    assert throttled["count"] == 1 and exact(tenant, balances)


# ---------------------------------------------------------------------------------------- balances and paging


def test_balances_are_exact_across_a_year_end_from_narrow_grouped_queries(sandbox):
    async def scenario(connector):
        clients = await listed(connector)
        return {t.org_number: await connector.fetch_balances(clients[t.org_number], MONTHS)
                for t in sandbox.ledger.valid_tenants}

    balances, transport = run(sandbox, scenario)
    for tenant in sandbox.ledger.valid_tenants:
        assert exact(tenant, balances[tenant.org_number]), tenant.name
    sums = [b["variables"] for b in graphql_bodies(transport) if queries().name_of(b["query"]) == "ledger_sums"]
    per_company = [v for v in sums if v["companyNo"] == company_no_of(sandbox.ledger.valid_tenants[0])]
    # window Dec 2025 - Feb 2026: before the fiscal year 2025, 2025 up to December, then one per month
    assert sorted((v["fromDate"], v["toDate"]) for v in per_company) == [
        (19000101, 20241231), (20250101, 20251130), (20251201, 20251231), (20260101, 20260131), (20260201, 20260228)]
    assert all(b.opening.as_tuple().exponent == -2 for b in balances[sandbox.ledger.valid_tenants[0].org_number])


def test_requests_per_tenant_month(sandbox):
    """The cost the module docstring states: N + 2 balance requests for N months (N + 1 from a
    fiscal-year start), measured on the simulator's request log."""
    tenant = sandbox.ledger.valid_tenants[0]
    scope = sandbox.scope_of(tenant)

    async def scenario(connector):
        client = (await listed(connector))[tenant.org_number]
        sandbox.reset_stats()
        await connector.fetch_balances(client, MONTHS)
        across = sandbox.stats.total
        sandbox.reset_stats()
        await connector.fetch_balances(client, months_between(dt.date(2026, 1, 1), dt.date(2026, 2, 1)))
        return across, sandbox.stats.total

    (across, from_year_start), _ = run(sandbox, scenario)
    assert (across, from_year_start) == (len(MONTHS) + 2, 2 + 1)
    assert fiscal_year_start(dt.date(2026, 2, 1)) == dt.date(2026, 1, 1)
    assert scope == str(company_no_of(tenant))


def test_the_chart_is_read_page_by_page_with_the_cursor(sandbox):
    tenant = sandbox.ledger.valid_tenants[0]

    async def scenario(connector):
        return await connector.fetch_accounts((await listed(connector))[tenant.org_number])

    accounts, transport = run(sandbox, scenario, page_size=8)
    assert [a.account_number for a in accounts] == [str(a.number) for a in sorted(tenant.accounts, key=lambda a: a.number)]
    pages = [b["variables"] for b in graphql_bodies(transport) if queries().name_of(b["query"]) == "general_ledger_accounts"]
    assert len(pages) == -(-len(tenant.accounts) // 8)
    assert pages[0]["after"] is None and all(p["first"] == 8 for p in pages)
    assert len({p["after"] for p in pages}) == len(pages)  # each page continues from the last endCursor


def test_a_chart_edited_while_paged_is_read_again(sandbox):
    tenant = sandbox.ledger.valid_tenants[0]
    sandbox.mutate_during_paging("/generalLedgerAccount", "remove", position=0, after_requests=1, tenant=tenant)

    async def scenario(connector):
        return await connector.fetch_accounts((await listed(connector))[tenant.org_number])

    accounts, _ = run(sandbox, scenario, page_size=8)
    numbers = [a.account_number for a in accounts]
    assert numbers == [str(a.number) for a in sorted(tenant.accounts, key=lambda a: a.number)][1:]


def test_a_truncated_company_list_is_refused(sandbox):
    def answer(request):
        if request.url.path == "/api/graphql-service" and "availableCompanies" in request.content.decode():
            return httpx.Response(200, json={"data": {"availableCompanies": {"totalCount": 9, "items": [
                {"name": "A", "companyNo": 1, "customerNo": 2}]}}})
        return None

    with pytest.raises(BadResponse) as caught:
        run(sandbox, listed, answer=answer)
    assert "1 of 9 companies" in str(caught.value)


def test_one_throttle_per_token_for_every_company_at_the_published_limits(sandbox):
    async def scenario(connector):
        clients = list((await listed(connector)).values())
        await asyncio.gather(*(connector.fetch_accounts(c) for c in clients))
        return connector.api.throttle

    throttle, _ = run(sandbox, scenario)
    assert (throttle.limit.requests_per_second, throttle.limit.max_in_flight) == (10, 60)  # 600/min, 60 in flight
    assert throttle.in_flight_limit == 60 and throttle.ceiling == pytest.approx(9.5)  # paced below the limit
