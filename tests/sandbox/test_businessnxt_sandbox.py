"""The Business NXT simulator: built from the SDL in specs/businessnxt/ (graphql-core executes every
request against it), and its behaviour against the truth ledger: grouped sums, cursor paging, the
HTML 401, Visma Connect's refusals, access errors in `errors[]` and the per-token limit."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import httpx
import pytest
from asgi_support import SyncASGITransport

from erp_pipelines.erps.kit.graphql import QueryBook
from erp_pipelines.sandbox.businessnxt import (
    API_PREFIX,
    CUSTOMER_TENANT_ID,
    SCOPES,
    BusinessNxtSandbox,
    company_no_of,
)
from erp_pipelines.sandbox.common import RateLimitPolicy
from erp_pipelines.sandbox.ledger import generate_ledger

ROOT = "http://bnxt.test"
LAST_MONTH = dt.date(2026, 2, 1)
BOOK = QueryBook("businessnxt")


@pytest.fixture
def sandbox() -> BusinessNxtSandbox:
    ledger = generate_ledger(3, first_month=dt.date(2025, 6, 1), last_month=LAST_MONTH)
    return BusinessNxtSandbox(ledger, rate_limit=RateLimitPolicy())


@pytest.fixture
def http(sandbox):
    with httpx.Client(transport=SyncASGITransport(sandbox.app), base_url=ROOT) as client:
        yield client


def token(http, sandbox, **changes) -> httpx.Response:
    form = {"grant_type": "client_credentials", "client_id": sandbox.client_id, "client_secret": sandbox.client_secret,
            "scope": SCOPES[0], "tenant_id": CUSTOMER_TENANT_ID, **changes}
    return http.post("/connect/token", data={k: v for k, v in form.items() if v is not None})


def ask(http, sandbox, query: str, variables: dict | None = None, bearer: str | None = None) -> httpx.Response:
    bearer = bearer or token(http, sandbox).json()["access_token"]
    return http.post(API_PREFIX, json={"query": query, "variables": variables or {}},
                     headers={"Authorization": f"Bearer {bearer}"})


def test_the_sandbox_serves_the_schema_the_queries_are_validated_against(sandbox):
    assert sandbox.schema is BOOK.schema
    assert BOOK.problems() == {}


def test_a_query_the_schema_refuses_is_answered_with_errors_and_no_data(http, sandbox):
    answer = ask(http, sandbox, "query { useCompany(no: 1) { generalLedgerAccount { items { balance } } } }")
    assert answer.status_code == 200
    body = answer.json()
    assert "data" not in body and "balance" in body["errors"][0]["message"]


def test_companies_identity_and_chart_match_the_ledger(http, sandbox):
    tenant = sandbox.ledger.valid_tenants[0]
    listed = ask(http, sandbox, BOOK.query("available_companies")).json()["data"]["availableCompanies"]
    assert listed["totalCount"] == len(sandbox.ledger.tenants) == len(listed["items"])
    assert {"name": tenant.name, "companyNo": company_no_of(tenant)}.items() <= listed["items"][0].items()
    no = company_no_of(tenant)
    identity = ask(http, sandbox, BOOK.query("company_identity"), {"companyNo": no}).json()
    assert identity["data"]["useCompany"]["companyInformation"]["items"] == [
        {"name": tenant.name, "organisationNo": tenant.org_number}]
    chart = ask(http, sandbox, BOOK.query("general_ledger_accounts"), {"companyNo": no}).json()
    accounts = chart["data"]["useCompany"]["generalLedgerAccount"]
    assert accounts["totalCount"] == len(tenant.accounts) and accounts["pageInfo"]["hasNextPage"] is False
    assert [a["accountNo"] for a in accounts["items"]] == sorted(a.number for a in tenant.accounts)


def test_cursor_pages_continue_from_the_end_cursor(http, sandbox):
    no = company_no_of(sandbox.ledger.valid_tenants[0])
    seen, after = [], None
    while True:
        page = ask(http, sandbox, BOOK.query("general_ledger_accounts"),
                   {"companyNo": no, "first": 10, "after": after}).json()["data"]["useCompany"]["generalLedgerAccount"]
        seen += [a["accountNo"] for a in page["items"]]
        if not page["pageInfo"]["hasNextPage"]:
            break
        after = page["pageInfo"]["endCursor"]
    assert len(seen) == len(set(seen)) == len(sandbox.ledger.valid_tenants[0].accounts)


def test_grouped_sums_per_month_equal_the_truth_movements(http, sandbox):
    tenant = sandbox.ledger.valid_tenants[1]
    answer = ask(http, sandbox, BOOK.query("ledger_sums"),
                 {"companyNo": company_no_of(tenant), "fromDate": 20260101, "toDate": 20260131}).json()
    items = answer["data"]["useCompany"]["generalLedgerTransaction"]["items"]
    sums = {row["accountNo"]: Decimal(str(row["aggregates"]["sum"]["postedAmountDomestic"])) for row in items}
    truth = {int(b.account_number): b.movement for b in tenant.expected_balances([dt.date(2026, 1, 1)]) if b.movement}
    assert {n: v for n, v in sums.items() if v} == truth
    assert sum(sums.values()) == 0  # double entry


def test_grouping_cannot_be_paged(http, sandbox):
    no = company_no_of(sandbox.ledger.valid_tenants[0])
    query = (f"query {{ useCompany(no: {no}) {{ generalLedgerTransaction(first: 5, groupBy: [{{accountNo: DEFAULT}}]) "
             "{ items { accountNo } } } }")
    body = ask(http, sandbox, query).json()
    assert "grouping" in body["errors"][0]["message"] and body["data"]["useCompany"]["generalLedgerTransaction"] is None


def test_a_401_is_an_nginx_html_page(http, sandbox):
    for bearer in ("not-a-token", None):
        answer = http.post(API_PREFIX, json={"query": BOOK.query("available_companies")},
                           headers={"Authorization": f"Bearer {bearer}"} if bearer else {})
        assert answer.status_code == 401 and answer.headers["content-type"].startswith("text/html")
        assert "<title>401 Authorization Required</title>" in answer.text
    valid = token(http, sandbox).json()["access_token"]
    sandbox.service_user_registered = False
    assert ask(http, sandbox, BOOK.query("available_companies"), bearer=valid).status_code == 401


def test_visma_connect_refuses_as_documented(http, sandbox):
    ok = token(http, sandbox).json()
    assert ok["token_type"] == "Bearer" and ok["expires_in"] > 0
    for changes, error in (({"client_secret": "wrong"}, "invalid_client"), ({"scope": "other"}, "invalid_scope"),
                           ({"tenant_id": "someone-else"}, "invalid_tenant"),
                           ({"grant_type": "password"}, "unsupported_grant_type")):
        refused = token(http, sandbox, **changes)
        assert (refused.status_code, refused.json()["error"]) == (400, error)
    assert token(http, sandbox, tenant_id=None).status_code == 200  # tenant_id is optional


def test_access_errors_come_in_errors_next_to_null_data(http, sandbox):
    revoked, denied = sandbox.ledger.valid_tenants[:2]
    sandbox.revoke(revoked)
    sandbox.deny_access(denied)
    gone = ask(http, sandbox, BOOK.query("company_identity"), {"companyNo": company_no_of(revoked)}).json()
    assert gone["data"] == {"useCompany": None} and gone["errors"][0]["path"] == ["useCompany"]
    assert "access" in gone["errors"][0]["message"]
    listed = ask(http, sandbox, BOOK.query("available_companies")).json()["data"]["availableCompanies"]["items"]
    assert company_no_of(revoked) not in {c["companyNo"] for c in listed}
    describable = ask(http, sandbox, BOOK.query("company_identity"), {"companyNo": company_no_of(denied)}).json()
    assert "errors" not in describable
    ledger = ask(http, sandbox, BOOK.query("general_ledger_accounts"), {"companyNo": company_no_of(denied)}).json()
    assert ledger["errors"][0]["path"] == ["useCompany", "generalLedgerAccount"]


def test_requests_are_filed_under_their_table_and_company(http, sandbox):
    tenant = sandbox.ledger.valid_tenants[0]
    ask(http, sandbox, BOOK.query("available_companies"))
    ask(http, sandbox, BOOK.query("ledger_sums"), {"companyNo": company_no_of(tenant), "fromDate": 1, "toDate": 2})
    records = sandbox.stats.requests()
    assert [(r.path, r.tenant) for r in records] == [
        (f"{API_PREFIX}/availableCompanies", None),
        (f"{API_PREFIX}/generalLedgerTransaction", sandbox.scope_of(tenant))]


def test_the_limit_is_per_token(http, sandbox):
    sandbox.set_rate_limit(RateLimitPolicy(limit=2, window_seconds=60))
    first, second = token(http, sandbox).json()["access_token"], token(http, sandbox).json()["access_token"]
    answers = [ask(http, sandbox, BOOK.query("available_companies"), bearer=first).status_code for _ in range(3)]
    assert answers == [200, 200, 429]
    assert ask(http, sandbox, BOOK.query("available_companies"), bearer=second).status_code == 200
