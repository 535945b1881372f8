"""The Xledger simulator: built from the SDL (graphql-core validates and executes every request),
Xledger's auth header, Relay paging, entities under the group, throttling as HTTP 200 errors, and
its rows against the truth ledger (a non-calendar fiscal year included)."""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal

import httpx
import pytest

from erp_pipelines.sandbox.common import RateLimitPolicy
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.xledger import (
    ACCESS_DENIED,
    BURST_LIMIT,
    CONCURRENCY_LIMIT,
    FISCAL_YEAR_START_MONTH,
    FISCAL_YEAR_TENANT,
    GROUP_DB_ID,
    INSUFFICIENT_CREDITS,
    XledgerSandbox,
)

BASE = "http://xledger.test"
ENTITIES = "query($after: String) { entities(first: 3, after: $after) { edges { cursor node { dbId ownerDbId " \
           "fiscalYearStartMonth parent { dbId } company { companyNumber } } } pageInfo { hasNextPage } } }"
BALANCES = "query($e: Int!) { accountBalances(first: 10000, filter: { ownerDbId: $e, year_gte: 2025, year_lte: 2026 })" \
           " { edges { node { dbId amount ownerDbId account { code } period { year monthNumber fiscalPeriod } } } } }"


@pytest.fixture
def sandbox():
    return XledgerSandbox(generate_ledger(3, first_month=dt.date(2025, 6, 1), last_month=dt.date(2026, 2, 1)))


def post(sandbox, query, variables=None, *, token=None, app=None):
    async def go():
        transport = httpx.ASGITransport(app=app or sandbox.app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as http:
            return await http.post("/graphql", json={"query": query, "variables": variables or {}},
                                   headers={"Authorization": f"token {token or sandbox.api_token}"})

    return asyncio.run(go())


def test_the_token_header_is_required(sandbox):
    assert post(sandbox, ENTITIES, token="wrong-token").status_code == 401
    assert post(sandbox, ENTITIES).status_code == 200


def test_a_query_the_schema_does_not_know_is_refused_by_validation(sandbox):
    body = post(sandbox, "{ entities { edges { node { vatNumber } } } }").json()
    assert "data" not in body and "vatNumber" in body["errors"][0]["message"]


def test_entities_page_by_the_last_edges_cursor_and_sit_under_the_group(sandbox):
    nodes, after = [], None
    while True:
        page = post(sandbox, ENTITIES, {"after": after}).json()["data"]["entities"]
        nodes += [edge["node"] for edge in page["edges"]]
        if not page["pageInfo"]["hasNextPage"]:
            break
        after = page["edges"][-1]["cursor"]
    assert nodes[0]["dbId"] == GROUP_DB_ID and nodes[0]["parent"] is None
    assert all(node["parent"]["dbId"] == GROUP_DB_ID for node in nodes[1:])
    assert sorted(n["company"]["companyNumber"] for n in nodes[1:]) == sorted(t.org_number for t in sandbox.ledger.tenants)
    fiscal = sandbox.ledger.valid_tenants[FISCAL_YEAR_TENANT]
    assert {n["company"]["companyNumber"]: n["fiscalYearStartMonth"] for n in nodes}[fiscal.org_number] == 7


def test_balance_rows_rebuild_the_truth_with_the_fiscal_years_opening_row(sandbox):
    tenant = sandbox.ledger.valid_tenants[FISCAL_YEAR_TENANT]
    assert tenant.fiscal_year_start_month == FISCAL_YEAR_START_MONTH
    entity = sandbox.entity(tenant).db_id
    edges = post(sandbox, BALANCES, {"e": entity}).json()["data"]["accountBalances"]["edges"]
    rows = [edge["node"] for edge in edges]
    assert {row["ownerDbId"] for row in rows} == {entity}
    openings = {row["account"]["code"]: Decimal(row["amount"]) for row in rows
                if row["period"]["fiscalPeriod"] == 0 and row["period"]["monthNumber"] == 7}
    july = {str(b.account.number): b for b in tenant.balances(dt.date(2025, 7, 1))}
    assert openings and all(Decimal(july[code].opening).scaleb(-2) == amount for code, amount in openings.items())
    assert all(int(code) < 3000 for code in openings)  # profit and loss restarts at the fiscal year's start
    august = {row["account"]["code"]: Decimal(row["amount"]) for row in rows
              if (row["period"]["year"], row["period"]["monthNumber"]) == (2025, 8) and row["period"]["fiscalPeriod"]}
    assert august == {str(b.account.number): Decimal(b.movement).scaleb(-2)
                      for b in tenant.balances(dt.date(2025, 8, 1)) if b.movement}


def test_the_truth_ledger_closes_a_non_calendar_year_at_its_end(sandbox):
    tenant = sandbox.ledger.valid_tenants[FISCAL_YEAR_TENANT]
    closing = [v for v in tenant.vouchers if v.description == "Årsoppgjør"]
    assert [v.date for v in closing] == [dt.date(2025, 6, 30)]
    july = {b.account.number: b for b in tenant.balances(dt.date(2025, 7, 1))}
    january = {b.account.number: b for b in tenant.balances(dt.date(2026, 1, 1))}
    assert july[3000].opening == 0 and january[3000].opening != 0


def test_a_rate_limited_request_answers_200_with_the_burst_code(sandbox):
    sandbox.set_rate_limit(RateLimitPolicy(limit=1, window_seconds=60))
    assert post(sandbox, ENTITIES).status_code == 200
    refused = post(sandbox, ENTITIES)
    assert refused.status_code == 200 and refused.json()["errors"][0]["code"] == BURST_LIMIT
    assert sandbox.stats.too_many_requests == 1  # counted as the harness's 429


def test_queued_codes_credits_and_denied_entities_answer_as_errors(sandbox):
    sandbox.answer_with_codes(CONCURRENCY_LIMIT)
    assert post(sandbox, ENTITIES).json()["errors"][0]["code"] == CONCURRENCY_LIMIT
    denied = sandbox.ledger.valid_tenants[0]
    sandbox.deny_access(denied)
    body = post(sandbox, BALANCES, {"e": sandbox.entity(denied).db_id}).json()
    assert body["errors"][0]["code"] == ACCESS_DENIED and body["data"] == {"accountBalances": None}
    sandbox.exhaust_credits("2026-03-01T00:00:00Z")
    error = post(sandbox, ENTITIES).json()["errors"][0]
    assert error["code"] == INSUFFICIENT_CREDITS and error["extensions"]["resetAt"] == "2026-03-01T00:00:00Z"


def test_requests_are_attributed_to_the_entity_named_in_the_correlation_header(sandbox):
    tenant = sandbox.ledger.valid_tenants[0]
    scope = sandbox.scope_of(tenant)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sandbox.app), base_url=BASE) as http:
            await http.post("/graphql", json={"query": BALANCES, "variables": {"e": int(scope)}},
                            headers={"Authorization": f"token {sandbox.api_token}",
                                     "X-Correlation-Id": f"erp-pipelines account_balances entity={scope}"})

    asyncio.run(go())
    assert [r.tenant for r in sandbox.stats.requests()] == [scope]


def test_a_paging_mutation_appends_a_new_row_last(sandbox):
    tenant = sandbox.ledger.valid_tenants[0]
    sandbox.mutate_during_paging(sandbox.paths.accounts, "insert", after_requests=1, tenant=tenant.erp_client_id)
    query = "query($e: Int) { accounts(first: 100, filter: { ownerDbId: $e }) { edges { node { code } } } }"
    entity = sandbox.entity(tenant).db_id
    before = [e["node"]["code"] for e in post(sandbox, query, {"e": entity}).json()["data"]["accounts"]["edges"]]
    after = [e["node"]["code"] for e in post(sandbox, query, {"e": entity}).json()["data"]["accounts"]["edges"]]
    assert after == before + [sandbox.paths.phantom_account]
