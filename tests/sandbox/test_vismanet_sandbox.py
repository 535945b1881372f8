"""The Visma.net simulator: its answers validated against the vendor's OpenAPI file
(specs/vismanet/), and its behaviour against the truth ledger: branches, the budget ledger, signs,
paging, tokens, refusals and rate-limit headers."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_support import SyncASGITransport
from openapi_core import Config, OpenAPI
from openapi_support import OpenAPIRequest, OpenAPIResponse

from erp_pipelines.sandbox.common import RateLimitPolicy
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.vismanet import API_PREFIX, MAX_PAGE_SIZE, SCOPE, VismaNetSandbox

SPEC = Path(__file__).resolve().parents[2] / "specs" / "vismanet" / "vismanet-erp-api-v1-openapi-20250424.json"
SPEC_HOST = "https://api.finance.visma.net"
ROOT = "http://vismanet.test"
LAST_MONTH = dt.date(2026, 2, 1)


# ---------------------------------------------------------------------------------------- contract






class VismaNetContract:
    """openapi-core validates request and response; then every field must be one the schema declares
    (the spec sets no additionalProperties: false, so openapi-core alone accepts invented fields)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.openapi = OpenAPI.from_dict(spec, config=Config(spec_validator_cls=None))  # 4 MB: no spec check

    def check(self, response: httpx.Response) -> Any:
        assert response.status_code == 200, response.text
        request = OpenAPIRequest(response.request, SPEC_HOST, response.request.url.path.removeprefix(API_PREFIX))
        self.openapi.validate_request(request)
        self.openapi.validate_response(request, OpenAPIResponse(response))
        operation = self.spec["paths"][request.path][request.method]
        body = json.loads(response.content, parse_float=Decimal)
        self.declared(operation["responses"]["200"]["content"]["application/json"]["schema"], body, "$")
        return body

    def declared(self, schema: dict[str, Any], value: Any, where: str) -> None:
        while "$ref" in schema:
            schema = self.spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        if isinstance(value, list):
            for i, item in enumerate(value):
                self.declared(schema.get("items", {}), item, f"{where}[{i}]")
        elif isinstance(value, dict) and "properties" in schema:
            for key, item in value.items():
                assert key in schema["properties"], f"{where}.{key} is not in the spec"
                self.declared(schema["properties"][key], item, f"{where}.{key}")


@pytest.fixture(scope="module")
def contract() -> VismaNetContract:
    return VismaNetContract(json.loads(SPEC.read_text()))  # once per module: the file is large


# ---------------------------------------------------------------------------------------- sandbox


@pytest.fixture
def sandbox() -> VismaNetSandbox:
    ledger = generate_ledger(3, first_month=dt.date(2025, 6, 1), last_month=LAST_MONTH)
    return VismaNetSandbox(ledger, rate_limit=RateLimitPolicy())


@pytest.fixture
def http(sandbox):
    with httpx.Client(transport=SyncASGITransport(sandbox.app), base_url=ROOT + API_PREFIX) as client:
        yield client


def token_response(http, sandbox, tenant: str | None, **changes) -> httpx.Response:
    form = {"grant_type": "client_credentials", "client_id": sandbox.client_id,
            "client_secret": sandbox.client_secret, "scope": SCOPE, "tenant_id": tenant, **changes}
    return http.post(ROOT + "/connect/token", data={k: v for k, v in form.items() if v is not None})


def get(http, sandbox, tenant, path: str, **params) -> httpx.Response:
    token = token_response(http, sandbox, sandbox.company(tenant).tenant_id).json()["access_token"]
    return http.get(path, params=params, headers={"Authorization": f"Bearer {token}"})


def test_identity_and_chart_match_the_spec_and_the_ledger(http, sandbox, contract):
    tenant = sandbox.ledger.valid_tenants[0]
    [organization] = contract.check(get(http, sandbox, tenant, "/v1/organization", expandBranches="true"))
    assert organization["corporateId"] == tenant.org_number and organization["name"] == tenant.name
    assert len(organization["branches"]) >= 2
    branches = contract.check(get(http, sandbox, tenant, "/v1/branch"))
    assert [b["isMainBranch"] for b in branches] == [True, False]
    accounts = contract.check(get(http, sandbox, tenant, "/v1/account"))
    assert [a["accountCD"] for a in accounts] == [str(a.number) for a in tenant.accounts]
    assert {a["metadata"]["totalCount"] for a in accounts} == {len(tenant.accounts)}


def test_balances_match_the_spec_and_sum_over_branches_to_the_truth(http, sandbox, contract):
    tenant = sandbox.ledger.valid_tenants[1]
    rows = contract.check(get(http, sandbox, tenant, "/v2/generalLedgerBalance", periodId="202601",
                              balanceType="Actual", toggleBalanceSigns="true", pageNumber=1, pageSize=500))
    assert {r["branch"]["number"] for r in rows} == {"1", "2"} and {r["balanceType"] for r in rows} == {"Actual"}
    totals: dict[str, list[Decimal]] = {}
    for row in rows:
        sums = totals.setdefault(row["account"]["number"], [Decimal(0)] * 3)
        sums[0] += row["beginningBalance"]
        sums[1] += row["periodToDateDebit"] - row["periodToDateCredit"]
        sums[2] += row["yearToDateBalance"]
    truth = {b.account_number: [b.opening, b.movement, b.closing]
             for b in tenant.expected_balances([dt.date(2026, 1, 1)])}
    assert {k: v for k, v in totals.items() if any(v)} == truth


def test_a_budget_ledger_is_there_unless_filtered_and_signs_toggle(http, sandbox, contract):
    tenant = sandbox.ledger.valid_tenants[0]
    every = contract.check(get(http, sandbox, tenant, "/v2/generalLedgerBalance", periodId="202602"))
    assert {r["balanceType"] for r in every} == {"Actual", "Budget"}
    default = {(r["branch"]["number"], r["account"]["number"]): r for r in every if r["balanceType"] == "Actual"}
    toggled = get(http, sandbox, tenant, "/v2/generalLedgerBalance", periodId="202602", balanceType="Actual",
                  toggleBalanceSigns="true")
    for row in contract.check(toggled):
        plain = default[(row["branch"]["number"], row["account"]["number"])]
        sign = -1 if row["account"]["type"] in ("Liability", "Income") else 1
        assert plain["yearToDateBalance"] == sign * row["yearToDateBalance"]
        assert plain["periodToDateDebit"] == row["periodToDateDebit"] >= 0


def test_pages_carry_metadata_and_the_size_is_capped(http, sandbox, contract):
    tenant = sandbox.ledger.valid_tenants[0]
    pages = [contract.check(get(http, sandbox, tenant, "/v1/account", pageNumber=n, pageSize=10)) for n in (1, 4)]
    assert [len(p) for p in pages] == [10, len(tenant.accounts) - 30]
    capped = get(http, sandbox, tenant, "/v2/generalLedgerBalance", periodId="202601", pageSize=10**6).json()
    assert capped[0]["metadata"]["maxPageSize"] == MAX_PAGE_SIZE["/v2/generalLedgerBalance"]
    assert len(capped) == capped[0]["metadata"]["totalCount"]
    assert get(http, sandbox, tenant, "/v2/generalLedgerBalance").status_code == 400  # periodId is mandatory


def test_the_token_endpoint_refuses_as_visma_connect_does(http, sandbox):
    tenant = sandbox.ledger.valid_tenants[0]
    company = sandbox.company(tenant)
    ok = token_response(http, sandbox, company.tenant_id)
    assert ok.status_code == 200 and ok.json()["token_type"] == "Bearer" and ok.json()["expires_in"] > 0
    for changes, error in (({"client_secret": "wrong"}, "invalid_client"), ({"scope": "other"}, "invalid_scope"),
                           ({"tenant": None}, "invalid_request"), ({"tenant": "nobody"}, "invalid_tenant")):
        refused = token_response(http, sandbox, **{"tenant": company.tenant_id, **changes})
        assert (refused.status_code, refused.json()["error"]) == (400, error)
    sandbox.revoke(tenant)
    assert token_response(http, sandbox, company.tenant_id).json()["error"] == "invalid_tenant"


def test_a_valid_token_of_a_customer_tenant_or_a_deactivated_app_gets_401(http, sandbox):
    tenant = sandbox.ledger.valid_tenants[0]
    company = sandbox.company(tenant)
    customer = token_response(http, sandbox, company.customer_tenant_id).json()["access_token"]
    assert http.get("/v1/organization", headers={"Authorization": f"Bearer {customer}"}).status_code == 401
    sandbox.deactivate_app(tenant)
    assert get(http, sandbox, tenant, "/v1/organization").status_code == 401
    other = sandbox.ledger.valid_tenants[1]
    sandbox.deny_access(other)  # ledger rights gone: still describable, reads refused
    assert get(http, sandbox, other, "/v1/organization").status_code == 200
    assert get(http, sandbox, other, "/v1/account").status_code == 403


def test_every_answer_reports_the_limit_per_company_and_a_429_its_reset(http, sandbox):
    sandbox.set_rate_limit(RateLimitPolicy(limit=3, window_seconds=60, reset_header_on_429=True))
    first, second = sandbox.ledger.valid_tenants[:2]
    answers = [get(http, sandbox, first, "/v1/branch") for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[0].headers["X-RateLimit-Limit"] == "3" and answers[2].headers["X-RateLimit-Remaining"] == "0"
    assert int(answers[3].headers["X-RateLimit-Reset"]) > 0
    assert get(http, sandbox, second, "/v1/branch").status_code == 200  # another company's own window
