"""Visma.net ERP: one Visma Connect token per company, signs and scope of the balances, paging by
the rows' metadata, per-tenant rate limits and the tenants Visma.net refuses."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from decimal import Decimal
from urllib.parse import parse_qsl

import httpx
import pytest

from erp_pipelines.config import connector_kwargs
from erp_pipelines.erps.kit import Reply
from erp_pipelines.erps.vismanet import VismaNetConnector, VismaPages, debit_positive
from erp_pipelines.errors import AuthError, BadResponse, ClientAccessError
from erp_pipelines.model import months_between
from erp_pipelines.registry import ERPS
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.vismanet import SCOPE, VismaNetSandbox

MONTHS = months_between(dt.date(2025, 12, 1), dt.date(2026, 1, 1))  # across a year end
BASE = "http://vismanet.test/api"


class Recorder(httpx.AsyncBaseTransport):
    """The sandbox app in-process; every request recorded, optionally rewritten first."""

    def __init__(self, app, rewrite=None) -> None:
        self.inner, self.rewrite, self.requests = httpx.ASGITransport(app=app), rewrite, []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request = self.rewrite(request) if self.rewrite else request
        self.requests.append(request)
        return await self.inner.handle_async_request(request)


def with_query(request: httpx.Request, **changes) -> httpx.Request:
    """The request with query parameters replaced (a value None removes one)."""
    query = {**dict(parse_qsl(request.url.query.decode())), **changes}
    url = request.url.copy_with(params={k: v for k, v in query.items() if v is not None})
    return httpx.Request(request.method, url, headers=request.headers, content=request.content)


@pytest.fixture
def sandbox():
    return VismaNetSandbox(generate_ledger(3, first_month=dt.date(2025, 6, 1), last_month=MONTHS[-1]))


def connector(sandbox, transport, **env_changes) -> VismaNetConnector:
    env = {**sandbox.environment(BASE), **env_changes}
    return VismaNetConnector(**connector_kwargs(ERPS["vismanet"], env), transport=transport)


def run(sandbox, scenario, *, rewrite=None, **env_changes):
    transport = Recorder(sandbox.app, rewrite)

    async def go():
        async with connector(sandbox, transport, **env_changes) as vismanet:
            return await scenario(vismanet)

    return asyncio.run(go()), transport


def exact(tenant, balances):
    key = lambda b: (b.period, b.account_number)
    return sorted((b for b in balances if not b.is_zero), key=key) == sorted(tenant.expected_balances(MONTHS), key=key)


async def listed(vismanet):
    return {c.org_number: c for c in await vismanet.list_clients()}


# ---------------------------------------------------------------------------------------- auth


def test_one_token_per_company_with_the_documented_form(sandbox):
    first, second = sandbox.ledger.valid_tenants[:2]

    async def scenario(vismanet):
        clients = await listed(vismanet)
        for tenant in (first, second):
            await vismanet.fetch_accounts(clients[tenant.org_number])
            await vismanet.fetch_balances(clients[tenant.org_number], MONTHS)

    _, transport = run(sandbox, scenario)
    token_calls = [r for r in transport.requests if r.url.path == "/connect/token"]
    forms = [dict(parse_qsl(r.content.decode())) for r in token_calls]
    assert all(set(form) == {"grant_type", "client_id", "client_secret", "scope", "tenant_id"} for form in forms)
    assert all(form["grant_type"] == "client_credentials" and form["scope"] == SCOPE for form in forms)
    assert all("authorization" not in r.headers for r in token_calls)  # client_secret_post, as documented
    assert sorted(form["tenant_id"] for form in forms) == sorted(sandbox.tenant_ids)  # once per company
    api_calls = [r for r in transport.requests if r.url.path.startswith("/api/")]
    assert api_calls and all(r.headers["authorization"].startswith("Bearer ") for r in api_calls)


def test_a_refused_client_secret_is_an_auth_error_naming_it(sandbox):
    with pytest.raises(AuthError) as caught:
        run(sandbox, lambda vismanet: vismanet.list_clients(), VISMANET_CLIENT_SECRET="x" * 24)
    assert "VISMANET_CLIENT_SECRET" in str(caught.value) and "x" * 24 not in str(caught.value)


def test_a_tenant_answering_401_fails_alone_named_by_its_tenant_id(sandbox, caplog):
    """A valid token that gets 401: the company deactivated our app (or the id is the customer tenant)."""
    gone, kept = sandbox.ledger.valid_tenants[:2]
    tenant_id = sandbox.company(gone).tenant_id

    async def scenario(vismanet):
        clients = await listed(vismanet)
        sandbox.deactivate_app(gone)
        with pytest.raises(ClientAccessError) as caught:
            await vismanet.fetch_balances(clients[gone.org_number], MONTHS)
        return caught.value, await listed(vismanet), await vismanet.fetch_balances(clients[kept.org_number], MONTHS)

    caplog.set_level(logging.WARNING)
    (error, relisted, balances), _ = run(sandbox, scenario)
    message = str(error)
    assert gone.name in message and tenant_id in message.partition("Fix:")[2]
    assert "customer tenant, not the company tenant" in message and "has not activated our app" in message
    assert gone.org_number not in relisted and kept.org_number in relisted  # left out of the list, logged
    assert tenant_id in caplog.text and "customer tenant" in caplog.text
    assert exact(kept, balances)


def test_a_customer_tenant_id_is_left_out_with_the_fix(sandbox, caplog):
    tenant = sandbox.ledger.valid_tenants[0]
    customer = sandbox.company(tenant).customer_tenant_id
    caplog.set_level(logging.WARNING)
    clients, _ = run(sandbox, listed, VISMANET_TENANT_IDS=f"{customer},{sandbox.tenant_ids[1]}")
    assert list(clients) == [sandbox.ledger.tenants[1].org_number]
    assert customer in caplog.text and "company tenant" in caplog.text


def test_a_company_that_withdrew_its_approval_fails_alone_with_the_fix(sandbox):
    gone, kept = sandbox.ledger.valid_tenants[:2]

    async def scenario(vismanet):
        clients = await listed(vismanet)
        sandbox.revoke(gone)
        with pytest.raises(ClientAccessError) as caught:
            await vismanet.fetch_accounts(clients[gone.org_number])
        return caught.value, await vismanet.fetch_balances(clients[kept.org_number], MONTHS)

    (error, balances), _ = run(sandbox, scenario)
    assert "invalid_tenant" in str(error) and "invitation code" in str(error) and gone.name in str(error)
    assert exact(kept, balances)


# ---------------------------------------------------------------------------------------- balances


@pytest.mark.parametrize("server_change", [
    {},  # the request as sent: actual ledger, the API's default signs
    {"balanceType": None},  # a server that ignores the ledger filter: budget rows come too
    {"toggleBalanceSigns": "true"},  # liability and income debit positive already
])
def test_balances_are_the_actual_ledger_summed_over_branches_debit_positive(sandbox, server_change):
    async def scenario(vismanet):
        clients = await listed(vismanet)
        return {t.org_number: await vismanet.fetch_balances(clients[t.org_number], MONTHS)
                for t in sandbox.ledger.valid_tenants}

    def rewrite(request):
        return with_query(request, **server_change) if "generalLedgerBalance" in request.url.path else request

    balances, transport = run(sandbox, scenario, rewrite=rewrite)
    for tenant in sandbox.ledger.valid_tenants:
        assert exact(tenant, balances[tenant.org_number]), tenant.name
    sent = [dict(parse_qsl(r.url.query.decode())) for r in transport.requests if "generalLedgerBalance" in r.url.path]
    assert {q["periodId"] for q in sent} == {"202512", "202601"}


def test_signs_follow_each_row_and_zero_movement_rows_their_type():
    def row(number, kind, beginning, debit, credit, ytd):
        return {"account": {"number": number, "type": kind}, "beginningBalance": Decimal(beginning),
                "periodToDateDebit": Decimal(debit), "periodToDateCredit": Decimal(credit),
                "yearToDateBalance": Decimal(ytd)}

    credit_positive = [row("2400", "Liability", "100", "0", "50", "150"), row("2000", "Liability", "30", "0", "0", "30"),
                       row("1920", "Asset", "10", "5", "0", "15")]
    debit_positive_rows = [row("2400", "Liability", "-100", "0", "50", "-150"),
                           row("2000", "Liability", "-30", "0", "0", "-30"), row("1920", "Asset", "10", "5", "0", "15")]
    expected = [("2400", (Decimal("-100.00"), Decimal("-50.00"), Decimal("-150.00"))),
                ("2000", (Decimal("-30.00"), Decimal("0.00"), Decimal("-30.00"))),
                ("1920", (Decimal("10.00"), Decimal("5.00"), Decimal("15.00")))]
    for rows in (credit_positive, debit_positive_rows):
        assert debit_positive(rows, where="test", tenant="t") == expected
    # a liability without movement anywhere in the answer: the documented default, credit positive
    assert debit_positive([row("2000", "Liability", "30", "0", "0", "30")], where="test", tenant="t")[0][1][0] == -30
    with pytest.raises(BadResponse):
        debit_positive([row("1920", "Asset", "10", "5", "0", "99")], where="test", tenant="t")


# ---------------------------------------------------------------------------------------- paging and limits


def reply(rows, total=None, cap=None):
    meta = {k: v for k, v in (("totalCount", total), ("maxPageSize", cap)) if v is not None}
    return Reply(200, httpx.Headers(), [{"n": n, **({"metadata": meta} if meta else {})} for n in rows])


def test_paging_ends_at_the_total_and_asks_for_the_cap():
    style = VismaPages(10)
    assert style.params(style.start) == {"pageNumber": 1, "pageSize": 10}
    page = style.page(reply(range(4), total=9, cap=4), style.start, "test")  # capped at 4 of 10
    assert page.next == (2, 4, 4) and page.version == 9
    assert style.page(reply(range(4, 9), total=9, cap=4), page.next, "test").next is None
    # a server that ignores the parameters sends everything at once: one request
    assert VismaPages(4).page(reply(range(31), total=31), (1, 4, 0), "test").next is None
    # without metadata: a short page ends the list
    assert VismaPages(4).page(reply(range(3)), (1, 4, 0), "test").next is None
    assert VismaPages(4).page(reply([]), (1, 4, 0), "test").next is None


def test_each_tenant_has_its_own_throttle_fed_by_the_rate_limit_headers(sandbox):
    async def scenario(vismanet):
        clients = list((await listed(vismanet)).values())
        await asyncio.gather(*(vismanet.fetch_accounts(c) for c in clients))
        return [vismanet._throttle(c.erp_client_id) for c in clients]

    throttles, _ = run(sandbox, scenario)
    assert len({id(t) for t in throttles}) == len(throttles)
    assert all(t.window_limit == sandbox.rate_limiter.policy.limit for t in throttles)
