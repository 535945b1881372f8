"""Xledger: GraphQL queries validated against the SDL, entities under the group, rows of several
entities mixed across pages, throttling codes in HTTP 200 bodies, spent credits, partial data,
a tenant without access, a non-calendar fiscal year and exact balances."""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal

import httpx
import pytest

from erp_pipelines.config import connector_kwargs
from erp_pipelines.erps.extract import ACCOUNTS, BALANCES, extract_tenant, extract_tenants
from erp_pipelines.erps.kit import RateLimit, Throttle, validation_errors
from erp_pipelines.erps.xledger import (
    BURST_LIMIT,
    CONCURRENCY_LIMIT,
    QUERIES,
    UNCONFIRMED,
    XledgerConnector,
    monthly_balances,
)
from erp_pipelines.errors import AuthError, BadResponse, ClientAccessError, QuotaExhausted, TenantMismatch
from erp_pipelines.model import Balance, classify_clients, months_between
from erp_pipelines.registry import ERPS
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.xledger import (
    FISCAL_YEAR_START_MONTH,
    FISCAL_YEAR_TENANT,
    GROUP_DB_ID,
    XledgerSandbox,
)

BASE = "http://xledger.test/graphql"
MONTHS = months_between(dt.date(2025, 12, 1), dt.date(2026, 2, 1))  # across a calendar year end


@pytest.fixture
def sandbox():
    return XledgerSandbox(generate_ledger(4, first_month=dt.date(2025, 6, 1), last_month=MONTHS[-1]))


def connector(sandbox, **options) -> XledgerConnector:
    """In-process, with its own fast throttle (the shared one paces at the real API's guessed rate)."""
    env = sandbox.environment(BASE) | options.pop("env", {})
    return XledgerConnector(**connector_kwargs(ERPS["xledger"], env), transport=httpx.ASGITransport(app=sandbox.app),
                            throttle=Throttle(RateLimit(requests_per_second=500, max_in_flight=4)), **options)


def run(sandbox, scenario, **options):
    async def go():
        async with connector(sandbox, **options) as xledger:
            return await scenario(xledger)

    return asyncio.run(go())


async def active(xledger) -> list:
    return [c for c in classify_clients(await xledger.list_clients()) if c.is_active]


def truth(sandbox, client, months=MONTHS) -> list[Balance]:
    tenant = next(t for t in sandbox.ledger.valid_tenants if t.org_number == client.org_number)
    return sorted(tenant.expected_balances(months), key=lambda b: (b.period, b.account_number))


def landed(extract) -> list[Balance]:
    return sorted(extract.balances, key=lambda b: (b.period, b.account_number))


def test_every_query_file_and_every_query_sent_is_valid_against_the_sdl(sandbox):
    assert set(QUERIES.queries) == {"entities", "entity", "accounts", "account_balances"}
    assert QUERIES.problems() == {}

    async def scenario(xledger):
        clients = await active(xledger)
        extracts = [e async for e in extract_tenants(xledger, clients, months=MONTHS)]
        await xledger.verify_tenant(clients[0])  # no read since the last guard: the identity query
        return extracts

    assert all(e.error is None for e in run(sandbox, scenario))
    sent = {body["query"] for body in sandbox.queries}
    assert {QUERIES.name_of(text) for text in sent} == set(QUERIES.queries)
    for text in sent:
        assert validation_errors(QUERIES.schema, text) == []


def test_the_clients_are_the_entities_under_the_group_with_their_organisation_numbers(sandbox):
    clients = run(sandbox, lambda xledger: xledger.list_clients())
    assert str(GROUP_DB_ID) not in {c.erp_client_id for c in clients}
    assert sorted(c.org_number for c in clients) == sorted(t.org_number for t in sandbox.ledger.tenants)
    assert {c.name for c in clients} == {t.name for t in sandbox.ledger.tenants}


def test_balances_equal_the_truth_ledger_to_the_ore_and_each_tenant_costs_two_requests(sandbox):
    async def scenario(xledger):
        clients = await active(xledger)
        sandbox.reset_stats()
        return [e async for e in extract_tenants(xledger, clients, months=MONTHS)]

    extracts = run(sandbox, scenario)
    assert len(extracts) == len(sandbox.ledger.valid_tenants)
    for extract in extracts:
        assert extract.error is None, extract.error
        assert landed(extract) == truth(sandbox, extract.client)
        assert all(isinstance(b.closing, Decimal) for b in extract.balances)
    # accounts and balances, one request each; the tenant guard rides on them (429s are not answers)
    assert sum(1 for r in sandbox.stats.requests() if r.status != 429) == 2 * len(extracts)


def test_rows_of_two_entities_interleaved_across_pages_are_grouped_by_owner():
    sandbox = XledgerSandbox(generate_ledger(2, first_month=dt.date(2025, 11, 1), last_month=MONTHS[-1],
                                             rejected_fixtures=False))
    sandbox.owner_filter_ignored = True  # the server sends every entity's rows, ordered by dbId
    first, second = sandbox.ledger.valid_tenants[:2]
    rows = sorted(sandbox.account_rows(sandbox.entity(first)) + sandbox.account_rows(sandbox.entity(second)),
                  key=lambda row: row["dbId"])
    assert len({row["ownerDbId"] for row in rows[:12]}) == 2  # a page of 12 holds both entities

    async def scenario(xledger):
        clients = {c.org_number: c for c in await active(xledger)}
        return [await extract_tenant(xledger, clients[t.org_number], what=(ACCOUNTS, BALANCES), months=MONTHS)
                for t in (first, second)]

    for extract, tenant in zip(run(sandbox, scenario, page_size=12), (first, second), strict=True):
        assert extract.error is None, extract.error
        assert landed(extract) == truth(sandbox, extract.client)
        assert sorted(a.account_number for a in extract.accounts) == sorted(str(a.number) for a in tenant.accounts)


def test_a_non_calendar_fiscal_year_restarts_profit_and_loss_at_its_start(sandbox):
    tenant = sandbox.ledger.valid_tenants[FISCAL_YEAR_TENANT]
    assert tenant.fiscal_year_start_month == FISCAL_YEAR_START_MONTH == 7
    months = months_between(dt.date(2025, 6, 1), dt.date(2026, 2, 1))  # July starts a year, January does not

    async def scenario(xledger):
        client = next(c for c in await active(xledger) if c.org_number == tenant.org_number)
        return client, await xledger.fetch_balances(client, months)

    client, balances = run(sandbox, scenario)
    rows = sorted((b for b in balances if not b.is_zero), key=lambda b: (b.period, b.account_number))
    assert rows == truth(sandbox, client, months)
    sales = {b.period: b for b in balances if b.account_number == "3000"}
    assert sales[dt.date(2025, 7, 1)].opening == 0  # the fiscal year starts in July
    assert sales[dt.date(2026, 1, 1)].opening == sales[dt.date(2025, 12, 1)].closing != 0  # not in January


@pytest.mark.parametrize("code", [BURST_LIMIT, CONCURRENCY_LIMIT])
def test_a_throttling_code_in_a_200_body_is_waited_out_and_retried(sandbox, code):
    async def scenario(xledger):
        client = (await active(xledger))[0]
        sandbox.answer_with_codes(code)
        extract = await extract_tenant(xledger, client, what=(ACCOUNTS, BALANCES), months=MONTHS)
        return extract, xledger.api.stats

    extract, stats = run(sandbox, scenario)
    assert extract.error is None and landed(extract) == truth(sandbox, extract.client)
    assert stats.rate_limited == 1 and stats.retries == 1


def test_spent_credits_stop_the_credentials_run_and_say_when_they_come_back(sandbox):
    async def scenario(xledger):
        clients = await active(xledger)
        sandbox.exhaust_credits("2026-03-01T00:00:00Z")
        first = await extract_tenant(xledger, clients[0], what=(ACCOUNTS, BALANCES), months=MONTHS)
        sent = sandbox.stats.total
        second = await extract_tenant(xledger, clients[1], what=(ACCOUNTS, BALANCES), months=MONTHS)
        return first, second, sandbox.stats.total - sent

    first, second, sent_after = run(sandbox, scenario)
    for extract in (first, second):
        assert isinstance(extract.error, QuotaExhausted) and extract.error.resume_at == "2026-03-01T00:00:00Z"
        assert "come back at 2026-03-01T00:00:00Z" in str(extract.error) and extract.balances == []
    assert first.error.attempts == 1  # not retried
    assert sent_after == 0  # the run stopped: nothing more was sent


def test_a_response_with_data_and_errors_is_refused_not_half_stored(sandbox):
    async def scenario(xledger):
        client = (await active(xledger))[0]
        sandbox.partial_answers = 1
        return await extract_tenant(xledger, client, what=(ACCOUNTS, BALANCES), months=MONTHS)

    extract = run(sandbox, scenario)
    assert isinstance(extract.error, BadResponse) and "partial data is refused" in str(extract.error)
    assert extract.accounts == [] and extract.balances == []


def test_a_tenant_without_access_fails_alone_with_its_fix(sandbox):
    denied = sandbox.ledger.valid_tenants[1]

    async def scenario(xledger):
        clients = await active(xledger)
        sandbox.deny_access(denied)
        return [e async for e in extract_tenants(xledger, clients, months=MONTHS)]

    extracts = run(sandbox, scenario)
    failed = [e for e in extracts if e.error is not None]
    assert [e.client.org_number for e in failed] == [denied.org_number]
    message = str(failed[0].error)
    assert isinstance(failed[0].error, ClientAccessError)
    assert denied.name in message and "Fix:" in message and "General Ledger read scope" in message
    for extract in extracts:
        if extract.error is None:
            assert landed(extract) == truth(sandbox, extract.client)


def test_an_entity_moved_out_of_the_group_fails_with_the_fix(sandbox):
    revoked = sandbox.ledger.valid_tenants[0]

    async def scenario(xledger):
        client = next(c for c in await active(xledger) if c.org_number == revoked.org_number)
        sandbox.revoke(revoked)
        listed = await xledger.list_clients()
        return listed, await extract_tenant(xledger, client, what=(ACCOUNTS, BALANCES), months=MONTHS)

    listed, extract = run(sandbox, scenario)
    assert revoked.org_number not in {c.org_number for c in listed}
    assert isinstance(extract.error, ClientAccessError) and "still under the group entity" in str(extract.error)


def test_another_companys_answer_is_a_tenant_mismatch(sandbox):
    tenant, other = sandbox.ledger.valid_tenants[:2]

    async def scenario(xledger):
        client = next(c for c in await active(xledger) if c.org_number == tenant.org_number)
        sandbox.swap_identity(tenant, other)
        return await extract_tenant(xledger, client, what=(ACCOUNTS, BALANCES), months=MONTHS)

    extract = run(sandbox, scenario)
    assert isinstance(extract.error, TenantMismatch) and other.org_number in str(extract.error)


def test_a_wrong_token_is_an_auth_error_naming_the_variable_and_sent_as_token(sandbox):
    with pytest.raises(AuthError) as caught:
        run(sandbox, lambda xledger: xledger.list_clients(), env={"XLEDGER_API_TOKEN": "wrong-token-0000000000"})
    assert "XLEDGER_API_TOKEN" in str(caught.value) and "wrong-token" not in str(caught.value)

    seen = []

    class Spy(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request):
            seen.append(request.headers["authorization"])
            return await httpx.ASGITransport(app=sandbox.app).handle_async_request(request)

    asyncio.run(_list_with(sandbox, Spy()))
    assert seen and all(value == f"token {sandbox.api_token}" for value in seen)


async def _list_with(sandbox, transport):
    async with XledgerConnector(**connector_kwargs(ERPS["xledger"], sandbox.environment(BASE)),
                                transport=transport) as xledger:
        return await xledger.list_clients()


def test_period_rows_become_monthly_balances_with_the_years_opening_row():
    def row(code, amount, year, month, fiscal_period):
        return {"amount": amount, "ownerDbId": 1, "account": {"code": code},
                "period": {"year": year, "monthNumber": month, "fiscalPeriod": fiscal_period}}

    nodes = [row("1920", "100.00", 2025, 7, 0), row("1920", "-30.50", 2025, 8, 2), row("3000", "-200.00", 2025, 8, 2),
             row("3000", "-10.00", 2025, 7, 1)]
    august = [b for b in monthly_balances(nodes, [dt.date(2025, 8, 1)], 7, tenant=None)]
    assert august == [Balance(dt.date(2025, 8, 1), "1920", Decimal("100.00"), Decimal("-30.50"), Decimal("69.50")),
                      Balance(dt.date(2025, 8, 1), "3000", Decimal("-10.00"), Decimal("-200.00"), Decimal("-210.00"))]
    with pytest.raises(BadResponse):
        monthly_balances([{**nodes[0], "amount": "ten"}], [dt.date(2025, 7, 1)], 7, tenant=None)


def test_every_assumption_is_listed_in_one_place():
    assert {"owner_filter", "balance_meaning", "sign", "access_codes"} <= set(UNCONFIRMED)
