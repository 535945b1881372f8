"""The PowerOffice Go simulator: contract tests against the vendor's OpenAPI files
(specs/poweroffice/) and behaviour tests against the truth ledger, the shared fault/rate-limit
machinery and the admin controls."""

from __future__ import annotations

import datetime as dt
import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from asgi_support import SyncASGITransport
from openapi_core import Config, OpenAPI
from openapi_schema_validator import OAS30Validator
from openapi_support import OpenAPIRequest, OpenAPIResponse

from erp_pipelines.model import normalise_tenant_id
from erp_pipelines.sandbox.common import RateLimitPolicy
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.poweroffice import (
    DEFAULT_RATE_LIMIT,
    INVALID_CLIENT,
    SUBSCRIPTION_HEADER,
    PowerOfficeSandbox,
    trial_balance_at,
)

SPECS = Path(__file__).resolve().parents[2] / "specs" / "poweroffice"
API_SPEC = SPECS / "poweroffice-go-v2-merged-openapi.yaml"
AUTH_SPEC = SPECS / "poweroffice-go-v2-authentication-demo-openapi.json"
API_SERVER = "http://localhost:8080"  # the merged spec's server; its paths are what follows /v2
AUTH_HOST, AUTH_PATH = "https://goapi.poweroffice.net", "/demo/oauth/Token"  # the auth spec's server + /Token
ROOT = "http://poweroffice.test"
LAST_MONTH = dt.date(2026, 3, 1)
CLIENT, OTHER = 80_001, 80_002  # valid tenants
PROBLEM_KEYS = {"Type", "Title", "Status", "Detail", "Instance"}
MONTH_ENDS = [dt.date(2025, 1, 31), dt.date(2025, 6, 30), dt.date(2025, 12, 31), dt.date(2026, 1, 31),
              dt.date(2026, 3, 31)]


def exact(response: httpx.Response) -> Any:
    """The body with every number as an exact Decimal (no float in between)."""
    return json.loads(response.content, parse_float=Decimal)


def kroner(ore: int) -> Decimal:
    return Decimal(ore) / 100


def month_of(day: dt.date) -> dt.date:
    return day.replace(day=1)


# ---------------------------------------------------------------------------------------- contract






class PowerOfficeContract:
    """Checks sandbox responses against the vendor's specs. The DTOs set additionalProperties:
    false, so openapi-core alone catches misspelt or invented fields."""

    def __init__(self, api: OpenAPI, auth: OpenAPI, problem_schema: dict[str, Any]) -> None:
        self.api = api
        self.auth = auth
        self.problem = OAS30Validator(problem_schema)

    @staticmethod
    def _api_request(response: httpx.Response) -> OpenAPIRequest:
        return OpenAPIRequest(response.request, API_SERVER, response.request.url.path.removeprefix("/v2"))

    def check(self, response: httpx.Response, status: int = 200) -> Any:
        """A valid request's response, validated; returns the exact body (None for 204)."""
        assert response.status_code == status, response.text
        request = self._api_request(response)
        self.api.validate_request(request)
        self.api.validate_response(request, OpenAPIResponse(response))
        return exact(response) if response.content else None

    def check_token(self, response: httpx.Response, status: int = 200) -> dict[str, Any]:
        assert response.status_code == status, response.text
        request = OpenAPIRequest(response.request, AUTH_HOST, AUTH_PATH)
        self.auth.validate_response(request, OpenAPIResponse(response))
        return response.json()

    def check_problem(self, response: httpx.Response, status: int, *, in_spec: bool = True) -> dict[str, Any]:
        """A ProblemDetails error with PascalCase keys only; validated against the operation's
        declared response when the path is in the spec."""
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) <= PROBLEM_KEYS and body["Status"] == status, body
        assert not list(self.problem.iter_errors(body))
        if in_spec:
            self.api.validate_response(self._api_request(response), OpenAPIResponse(response))
        return body

    def check_unauthorized(self, response: httpx.Response) -> None:
        """401 for a missing/unknown/expired token: no body (none declared), a Bearer challenge."""
        assert response.status_code == 401, response.text
        assert response.content == b"" and response.headers["www-authenticate"].startswith("Bearer")
        self.api.validate_response(self._api_request(response), OpenAPIResponse(response))


@pytest.fixture(scope="module")
def contract() -> PowerOfficeContract:
    with API_SPEC.open() as handle:  # 1.5 MB: the C loader takes a fraction of a second
        api_spec = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    auth_spec = json.loads(AUTH_SPEC.read_text())
    # skip the (slow) check of the spec itself; the merged file dropped its securitySchemes anyway
    config = Config(spec_validator_cls=None)
    return PowerOfficeContract(
        OpenAPI.from_dict(api_spec, config=config), OpenAPI.from_dict(auth_spec, config=config),
        api_spec["components"]["schemas"]["ProblemDetails"])


# ---------------------------------------------------------------------------------------- sandbox


@pytest.fixture
def ledger():
    # 5 valid tenants (index 3 is a sole proprietorship) + 4 rejected fixtures = 9 clients
    return generate_ledger(5, last_month=LAST_MONTH)


@pytest.fixture
def sandbox(ledger) -> PowerOfficeSandbox:
    # unlimited: the real 10/s would throttle the other tests; the rate-limit test sets it
    return PowerOfficeSandbox(ledger, rate_limit=RateLimitPolicy())


class PowerOfficeTestClient:
    """A sync httpx.Client over the ASGI app; mints one token per client on first use."""

    def __init__(self, http: httpx.Client, sandbox: PowerOfficeSandbox) -> None:
        self.http = http
        self.sandbox = sandbox
        self.tokens: dict[int, str] = {}

    def request_token(self, client_key: str, *, path: str = "/OAuth/Token",
                      application_key: str | None = None, subscription_key: str | None = "default",
                      grant_type: str = "client_credentials") -> httpx.Response:
        headers = self._subscription(subscription_key)
        return self.http.post(ROOT + path, data={"grant_type": grant_type}, headers=headers,
                              auth=(application_key or self.sandbox.application_key, client_key))

    def token(self, client_id: int) -> str:
        response = self.request_token(self.sandbox.client_key_of(client_id))
        assert response.status_code == 200, response.text
        self.tokens[client_id] = response.json()["access_token"]
        return self.tokens[client_id]

    def get(self, path: str, client_id: int, *, subscription_key: str | None = "default",
            token: str | None = None, **params: Any) -> httpx.Response:
        token = token or self.tokens.get(client_id) or self.token(client_id)
        headers = {"Authorization": f"Bearer {token}", **self._subscription(subscription_key)}
        return self.http.get(path, params=params, headers=headers)

    def _subscription(self, key: str | None) -> dict[str, str]:
        key = self.sandbox.subscription_key if key == "default" else key
        return {SUBSCRIPTION_HEADER: key} if key else {}


@pytest.fixture
def api(sandbox):
    with httpx.Client(transport=SyncASGITransport(sandbox.app), base_url=ROOT + "/v2") as http:
        yield PowerOfficeTestClient(http, sandbox)


@pytest.fixture
def admin(sandbox):
    """A client for the admin routes (/_sandbox/...)."""
    with httpx.Client(transport=SyncASGITransport(sandbox.app), base_url=ROOT + "/_sandbox") as http:
        yield http


# ======================================================================================== contract


@pytest.mark.parametrize("path", ["/OAuth/Token", "/Demo/OAuth/Token", "/demo/oauth/Token", "/oauth/token"])
def test_contract_token_endpoint(api, sandbox, contract, path):
    body = contract.check_token(api.request_token(sandbox.client_key_of(CLIENT), path=path))
    assert body["token_type"] == "bearer" and body["expires_in"] == 1200 and body["access_token"]
    settings = contract.check(api.get("/OrganizationSettings", CLIENT, token=body["access_token"]))
    assert settings["OrganizationNumber"] == sandbox.ledger.by_client_id(CLIENT).org_number
    assert sandbox.tokens_minted == 1


def test_contract_token_errors(api, sandbox, contract):
    key = sandbox.client_key_of(CLIENT)
    refused = {"error": "invalid_client", "error_description": INVALID_CLIENT}
    assert contract.check_token(api.request_token("00000000-0000-4000-8000-000000000000"), 400) == refused
    wrong_application = api.request_token(key, application_key="wrong-application-key")
    assert contract.check_token(wrong_application, 400) == refused
    sandbox.deactivate_client(CLIENT)
    assert contract.check_token(api.request_token(key), 400) == refused
    sandbox.activate_client(CLIENT)
    password_grant = contract.check_token(api.request_token(key, grant_type="password"), 400)
    assert password_grant["error"] == "unsupported_grant_type"
    # the gateway refuses a missing or wrong subscription key before PowerOffice (body UNCONFIRMED)
    for subscription_key in (None, "0" * 32):
        refused_key = api.request_token(key, subscription_key=subscription_key)
        assert refused_key.status_code == 401 and refused_key.json()["statusCode"] == 401
    assert api.http.get(ROOT + "/OAuth/Token").status_code == 405
    assert sandbox.tokens_minted == 0


def test_contract_client_endpoints_for_every_client(api, sandbox, ledger, contract):
    for tenant in ledger.tenants:  # valid tenants and rejected fixtures alike
        settings = contract.check(api.get("/OrganizationSettings", tenant.erp_client_id))
        assert (settings["Name"], settings["OrganizationNumber"]) == (tenant.name, tenant.org_number)
        financial = contract.check(api.get("/FinancialSettings", tenant.erp_client_id))
        assert (financial["FinancialYearEndMonth"], financial["CurrencyCode"]) == ("December", "NOK")
        assert financial["ConversionDate"] == ledger.first_month.isoformat()
        info = contract.check(api.get("/ClientIntegrationInformation", tenant.erp_client_id))
        assert info["ClientId"] == settings["Id"] and info["InvalidPrivileges"] == []
    fixture = ledger.by_client_id(80_005)
    assert api.get("/OrganizationSettings", 80_005).json()["OrganizationNumber"] == fixture.org_number == ""


def test_contract_general_ledger_accounts(api, ledger, contract):
    accounts = contract.check(api.get("/GeneralLedgerAccounts", CLIENT))
    tenant = ledger.by_client_id(CLIENT)
    assert [(a["AccountNo"], a["Name"]) for a in accounts] == [
        (a.number, a.name) for a in sorted(tenant.accounts, key=lambda a: a.number)]
    types = {a["AccountNo"]: a["GeneralLedgerAccountType"] for a in accounts}
    assert (types[1920], types[2000], types[2050], types[2400], types[3000], types[6300], types[8960]) == (
        "Asset", "Equity", "Equity", "Liability", "Income", "Expense", "Expense")
    assert len({a["Id"] for a in accounts}) == len(accounts)

    some = contract.check(api.get("/GeneralLedgerAccounts", CLIENT, accountNos="1000-1999, 2400, 8000-"))
    assert [a["AccountNo"] for a in some] == [
        a.number for a in sorted(tenant.accounts, key=lambda a: a.number)
        if 1000 <= a.number <= 1999 or a.number == 2400 or a.number >= 8000]
    narrow = contract.check(api.get("/GeneralLedgerAccounts", CLIENT, accountNos="1920",
                                    Fields="AccountNo,Name"))
    assert narrow == [{"AccountNo": 1920, "Name": "Bankinnskudd"}]
    contract.check(api.get("/GeneralLedgerAccounts", CLIENT, accountNos="9000-"), 204)
    contract.check_problem(api.get("/GeneralLedgerAccounts", CLIENT, Fields="AccountNo,Nope"), 400)


def test_contract_trial_balance(api, contract):
    everything = contract.check(api.get("/TrialBalance", CLIENT, date="2026-02-28"))
    assert [r["AccountNo"] for r in everything] == sorted(r["AccountNo"] for r in everything)
    nonzero = contract.check(api.get("/TrialBalance", CLIENT, date="2026-02-28",
                                     hideAccountsWithZeroBalance="true"))
    assert nonzero == [r for r in everything if r["Balance"] != 0] and len(nonzero) < len(everything)
    bank = contract.check(api.get("/TrialBalance", CLIENT, date="2026-02-28", accountNos="1920"))
    assert bank == [r for r in everything if r["AccountNo"] == 1920]
    before_the_ledger = api.get("/TrialBalance", CLIENT, date="2024-12-31")
    assert contract.check(before_the_ledger, 204) is None
    # a time and offset part is ignored
    assert exact(api.get("/TrialBalance", CLIENT, date="2026-02-28T23:59:00+01:00")) == everything
    # no departments or projects in this ledger: -1 (= lines without) keeps everything, a code nothing
    assert exact(api.get("/TrialBalance", CLIENT, date="2026-02-28", departmentCodes="-1")) == everything
    assert api.get("/TrialBalance", CLIENT, date="2026-02-28", departmentCodes="1").status_code == 204

    missing = contract.check_problem(api.get("/TrialBalance", CLIENT), 400)
    assert "date" in missing["Detail"]
    contract.check_problem(api.get("/TrialBalance", CLIENT, date="31.12.2025"), 400)
    contract.check_problem(api.get("/TrialBalance", CLIENT, date="2025-12-31",
                                   hideAccountsWithZeroBalance="yes"), 400)


def test_contract_account_transactions_sum_to_the_truth_movement(api, ledger, contract):
    month = dt.date(2026, 2, 1)
    rows = contract.check(api.get("/AccountTransactions", CLIENT, fromDate="2026-02-01", toDate="2026-02-28"))
    assert all("2026-02-01" <= r["PostingDate"] <= "2026-02-28" for r in rows)
    movement: dict[int, Decimal] = {}
    for row in rows:
        movement[row["AccountNo"]] = movement.get(row["AccountNo"], Decimal(0)) + row["Amount"]
    truth = ledger.by_client_id(CLIENT).balances(month)
    assert {b.account.number: kroner(b.movement) for b in truth if b.movement} == {
        n: v for n, v in movement.items() if v}
    bank = contract.check(api.get("/AccountTransactions", CLIENT, fromDate="2026-02-01", toDate="2026-02-28",
                                  accountNos="1920", voucherTypes="PayrollJournal"))
    assert bank and all(r["AccountNo"] == 1920 and r["VoucherType"] == "PayrollJournal" for r in bank)
    missing = contract.check_problem(api.get("/AccountTransactions", CLIENT, fromDate="2026-02-01"), 400)
    assert "toDate" in missing["Detail"]


def test_contract_unauthorized_forbidden_and_not_found(api, sandbox, contract):
    contract.check_unauthorized(api.http.get("/OrganizationSettings",
                                             headers={SUBSCRIPTION_HEADER: sandbox.subscription_key}))
    contract.check_unauthorized(api.get("/OrganizationSettings", CLIENT, token="not-a-token"))
    no_key = api.get("/OrganizationSettings", CLIENT, subscription_key=None)
    assert no_key.status_code == 401 and "missing subscription key" in no_key.json()["message"]

    sandbox.withdraw_privileges(CLIENT)  # the client lacks the modules for ledger data
    contract.check_problem(api.get("/TrialBalance", CLIENT, date="2026-01-31"), 403)
    contract.check_problem(api.get("/GeneralLedgerAccounts", CLIENT), 403)
    assert api.get("/OrganizationSettings", CLIENT).status_code == 200  # still listed
    info = contract.check(api.get("/ClientIntegrationInformation", CLIENT))
    assert set(info["InvalidPrivileges"]) == {"GeneralLedgerAccount", "TrialBalance", "AccountTransaction"}
    assert api.get("/TrialBalance", OTHER, date="2026-01-31").status_code == 200
    sandbox.restore_privileges(CLIENT)
    assert api.get("/TrialBalance", CLIENT, date="2026-01-31").status_code == 200

    contract.check_problem(api.get("/Nothing", CLIENT), 404, in_spec=False)


# ======================================================================================== paging


def test_paging_x_pagination_and_limits(api, ledger, contract):
    total = len(ledger.by_client_id(CLIENT).accounts)
    full = contract.check(api.get("/GeneralLedgerAccounts", CLIENT))
    pages, metas, number = [], [], 1
    while True:
        response = api.get("/GeneralLedgerAccounts", CLIENT, PageNumber=number, PageSize=7)
        if response.status_code == 204:
            contract.check(response, 204)
            break
        pages.append(contract.check(response))
        metas.append(json.loads(response.headers["X-Pagination"]))
        number += 1
    assert [row for page in pages for row in page] == full
    assert [len(page) for page in pages] == [7] * (total // 7) + ([total % 7] if total % 7 else [])
    assert metas[0]["previousPageLink"] is None and metas[-1]["nextPageLink"] is None
    assert all((m["totalCount"], m["pageSize"], m["totalPages"]) == (total, 7, len(pages)) for m in metas)
    assert [m["currentPage"] for m in metas] == list(range(1, len(pages) + 1))
    following = api.http.get(metas[0]["nextPageLink"], headers={
        "Authorization": f"Bearer {api.tokens[CLIENT]}", SUBSCRIPTION_HEADER: api.sandbox.subscription_key})
    assert exact(following) == pages[1]
    # names bind case-insensitively, with or without the resourceParameter prefix
    assert exact(api.get("/GeneralLedgerAccounts", CLIENT, pagenumber=2, pagesize=7)) == pages[1]
    assert exact(api.get("/GeneralLedgerAccounts", CLIENT, **{"resourceParameter.PageNumber": 2,
                                                               "resourceParameter.PageSize": 7})) == pages[1]

    assert contract.check(api.get("/GeneralLedgerAccounts", CLIENT, PageSize=20_000)) == full
    too_large = contract.check_problem(api.get("/GeneralLedgerAccounts", CLIENT, PageSize=20_001), 400)
    assert too_large["Title"] == "Invalid resourceParameter"
    contract.check_problem(api.get("/GeneralLedgerAccounts", CLIENT, PageNumber=0), 400)
    contract.check_problem(api.get("/TrialBalance", CLIENT, date="2026-01-31", PageSize="many"), 400)
    assert contract.check(api.get("/TrialBalance", CLIENT, date="2026-01-31", PageNumber=99), 204) is None


def test_page_shifts_when_the_list_changes_while_paging(api, admin, sandbox):
    sandbox.mutate_during_paging("/GeneralLedgerAccounts", "insert", after_requests=1, tenant=CLIENT)
    first = api.get("/GeneralLedgerAccounts", CLIENT, PageSize=10)
    second = api.get("/GeneralLedgerAccounts", CLIENT, PageSize=10, PageNumber=2)
    # an account was inserted at the front: page 2 repeats page 1's last row
    assert second.json()[0] == first.json()[-1]
    assert json.loads(second.headers["X-Pagination"])["totalCount"] == (
        json.loads(first.headers["X-Pagination"])["totalCount"] + 1)
    assert api.get("/GeneralLedgerAccounts", OTHER).json()[0]["AccountNo"] == 1200  # other clients: unchanged

    sandbox.clear_paging_mutations()
    created = admin.post("/poweroffice/paging-mutations", json={
        "path": "/v2/TrialBalance", "action": "remove", "tenant": sandbox.tenant_scope(CLIENT)})
    assert created.status_code == 201 and created.json()["tenant"] == CLIENT
    everything = [r["AccountNo"] for r in api.get("/TrialBalance", OTHER, date="2026-01-31").json()]
    page1 = api.get("/TrialBalance", CLIENT, date="2026-01-31", PageSize=5).json()
    page2 = api.get("/TrialBalance", CLIENT, date="2026-01-31", PageSize=5, PageNumber=2).json()
    assert [r["AccountNo"] for r in page1 + page2] == everything[:5] + everything[6:11]  # one row skipped
    unpaged = admin.post("/poweroffice/paging-mutations", json={"path": "/OrganizationSettings"})
    assert unpaged.status_code == 400
    assert admin.delete("/poweroffice/paging-mutations").json() == {"paging_mutations": 0}


# ======================================================================================== amounts


def test_trial_balance_equals_the_truth_for_every_valid_tenant(api, ledger):
    for tenant in ledger.valid_tenants:
        for day in MONTH_ENDS:
            response = api.get("/TrialBalance", tenant.erp_client_id, date=day.isoformat())
            # exact two-decimal number tokens, never floats such as 1234.5 or 1e-05
            tokens = re.findall(rb'"Balance":([^,}]+)', response.content)
            assert tokens and all(re.fullmatch(rb"-?\d+\.\d\d", token) for token in tokens)
            rows = {r["AccountNo"]: r["Balance"] for r in exact(response)}
            truth = tenant.balances(month_of(day))
            assert set(rows) <= {b.account.number for b in truth}
            for b in truth:
                assert rows.get(b.account.number, Decimal("0.00")) == kroner(b.closing), (tenant.name, day, b)
                if b.account.is_profit_and_loss and day.month == 1:  # year to date
                    assert b.opening == 0 and rows.get(b.account.number, 0) == kroner(b.movement)
            assert sum(rows.values()) == 0, (tenant.name, day)


def test_trial_balance_is_inclusive_of_its_date(api, ledger):
    tenant = ledger.by_client_id(CLIENT)
    day = next(v.date for v in tenant.vouchers if v.date.month == 2 and v.date.day > 1)

    def balances(date: dt.date) -> dict[int, Decimal]:
        rows = exact(api.get("/TrialBalance", CLIENT, date=date.isoformat()))
        return {r["AccountNo"]: r["Balance"] for r in rows}

    before, at = balances(day - dt.timedelta(days=1)), balances(day)
    posted: dict[int, int] = {}
    for voucher in (v for v in tenant.vouchers if v.date == day):
        for number, amount in voucher.lines:
            posted[number] = posted.get(number, 0) + amount
    assert posted
    for number in set(at) | set(before):
        assert at.get(number, 0) - before.get(number, 0) == kroner(posted.get(number, 0))


def test_year_end_closing_and_an_unclosed_year():
    closed = generate_ledger(2, last_month=dt.date(2026, 1, 1), rejected_fixtures=False).tenants[0]
    year_end = trial_balance_at(closed, dt.date(2025, 12, 31))
    assert sum(v for n, v in year_end.items() if n >= 3000) == 0  # the 8960/2050 closing voucher
    # a year the ledger has not closed: its result lands on retained earnings, the balance still sums to 0
    open_year = generate_ledger(2, last_month=dt.date(2025, 12, 1), rejected_fixtures=False).tenants[0]
    at_year_end = trial_balance_at(open_year, dt.date(2025, 12, 31))
    after = trial_balance_at(open_year, dt.date(2026, 1, 31))
    assert all(n < 3000 for n in after) and sum(after.values()) == 0
    assert after[2050] == at_year_end[2050] + sum(v for n, v in at_year_end.items() if n >= 3000)


# ======================================================================================== tokens and clients


def test_one_token_is_one_client(api, ledger):
    for client_id in (CLIENT, OTHER):
        name = api.get("/OrganizationSettings", client_id).json()["Name"]
        assert name == ledger.by_client_id(client_id).name
    assert api.tokens[CLIENT] != api.tokens[OTHER]


def test_deactivated_client_is_refused_over_admin_http(api, admin, sandbox, contract):
    token = api.token(CLIENT)
    assert admin.post(f"/poweroffice/clients/{CLIENT}/deactivate").json()["active"] is False
    contract.check_unauthorized(api.get("/OrganizationSettings", CLIENT, token=token))  # live tokens stop
    assert api.request_token(sandbox.client_key_of(CLIENT)).json()["error"] == "invalid_client"
    assert api.get("/OrganizationSettings", OTHER).status_code == 200  # the others are unaffected
    admin.post(f"/poweroffice/clients/{CLIENT}/activate")
    assert api.get("/OrganizationSettings", CLIENT, token=token).status_code == 200
    assert admin.post("/poweroffice/clients/999/deactivate").status_code == 404
    states = {c["id"]: c for c in admin.get("/poweroffice/clients").json()}
    assert states[CLIENT]["active"] is True and states[CLIENT]["scope"] == sandbox.tenant_scope(CLIENT)


def test_expire_all_tokens_then_a_new_token_works(api, admin, sandbox, contract):
    old = [api.token(CLIENT), api.token(OTHER)]
    assert admin.post("/poweroffice/tokens/expire").json() == {"expired": 2}
    for token in old:
        contract.check_unauthorized(api.get("/OrganizationSettings", CLIENT, token=token))
    fresh = api.token(CLIENT)
    assert api.get("/OrganizationSettings", CLIENT, token=fresh).status_code == 200
    assert sandbox.tokens_minted == 3 and sandbox.expire_all_tokens() == 1


def test_token_expires_after_its_lifetime(api, sandbox, contract):
    now = [1000.0]
    sandbox.clock = lambda: now[0]
    token = api.token(CLIENT)
    now[0] += 1199
    assert api.get("/FinancialSettings", CLIENT, token=token).status_code == 200
    now[0] += 1
    contract.check_unauthorized(api.get("/FinancialSettings", CLIENT, token=token))


def test_impersonation_answers_with_another_company(api, admin, sandbox, ledger):
    state = admin.put(f"/poweroffice/clients/{CLIENT}/impersonate", json={"as": OTHER}).json()
    assert state["impersonate_as"] == OTHER
    settings = api.get("/OrganizationSettings", CLIENT).json()
    assert settings["OrganizationNumber"] == ledger.by_client_id(OTHER).org_number
    info = api.get("/ClientIntegrationInformation", CLIENT).json()
    assert info["ClientName"] == ledger.by_client_id(OTHER).name
    other = api.get("/TrialBalance", OTHER, date="2026-01-31").json()
    assert api.get("/TrialBalance", CLIENT, date="2026-01-31").json() == other
    # statistics and fault scopes still name the client whose key asked
    assert sandbox.stats.requests(template="/v2/TrialBalance")[-1].tenant == sandbox.tenant_scope(CLIENT)
    admin.delete(f"/poweroffice/clients/{CLIENT}/impersonate")
    assert api.get("/OrganizationSettings", CLIENT).json()["Name"] == ledger.by_client_id(CLIENT).name
    assert admin.put(f"/poweroffice/clients/{CLIENT}/impersonate", json={}).status_code == 400


def test_added_client_has_a_key_and_serves_its_truth(api, admin, sandbox, ledger):
    created = admin.post("/poweroffice/clients", json={"name": "Nyoppstartet Bakeri AS"})
    assert created.status_code == 201
    state = created.json()
    tenant = ledger.by_client_id(state["id"])
    assert state["client_key"] == sandbox.client_key_of(tenant.erp_client_id) == sandbox.client_keys[-1]
    assert normalise_tenant_id(tenant.org_number) == tenant.org_number
    assert tenant.org_number not in {t.org_number for t in ledger.tenants if t is not tenant}
    assert api.get("/OrganizationSettings", tenant.erp_client_id).json()["Name"] == "Nyoppstartet Bakeri AS"
    rows = {r["AccountNo"]: r["Balance"] for r in exact(api.get("/TrialBalance", tenant.erp_client_id,
                                                                  date="2026-03-31"))}
    truth = {b.account.number: kroner(b.closing) for b in tenant.balances(LAST_MONTH)}
    assert rows == {number: closing for number, closing in truth.items() if number in rows}
    assert all(closing == 0 for number, closing in truth.items() if number not in rows)

    again, key = sandbox.add_client(company_type="ENK")
    assert key == sandbox.client_key_of(again.erp_client_id)
    assert again.erp_client_id == tenant.erp_client_id + 1
    assert len(sandbox.client_keys) == len(set(sandbox.client_keys)) == len(ledger.tenants)


def test_simulator_hooks(sandbox, ledger):
    url = "http://127.0.0.1:8711/v2"
    env = sandbox.environment(url)
    assert env["POWEROFFICE_TOKEN_URL"] == "http://127.0.0.1:8711/OAuth/Token"
    assert env["POWEROFFICE_CLIENT_KEYS"].split(",") == sandbox.client_keys and len(sandbox.client_keys) == 9
    wrong, variable = sandbox.wrong_credential(env)
    assert variable == "POWEROFFICE_SUBSCRIPTION_KEY" and wrong[variable] != sandbox.subscription_key
    assert re.fullmatch(r"[0-9a-f]{32}", sandbox.subscription_key)
    uuid_like = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert all(re.fullmatch(uuid_like, key) for key in sandbox.client_keys)
    tenant = ledger.by_client_id(CLIENT)
    assert sandbox.scope_of(tenant) == sandbox.tenant_scope(CLIENT) == sandbox.tenant_scope(tenant)
    assert re.fullmatch(r"key-[0-9a-f]{12}", sandbox.tenant_scope(CLIENT))
    again = PowerOfficeSandbox(generate_ledger(5, last_month=LAST_MONTH))
    assert again.client_keys == sandbox.client_keys  # derived from the tenants' seeds


# ======================================================================================== rate limits


def test_rate_limit_is_shared_by_all_client_keys_and_counts_token_calls(api, sandbox, contract):
    assert PowerOfficeSandbox(sandbox.ledger).rate_limiter.policy == DEFAULT_RATE_LIMIT  # 10 per second
    now = [500.0]
    sandbox.rate_limiter.clock = lambda: now[0]
    sandbox.set_rate_limit(DEFAULT_RATE_LIMIT)
    for client_id in (80_000, CLIENT, OTHER):
        api.token(client_id)  # 3 token calls
    calls = [api.get("/OrganizationSettings", client_id) for client_id in (80_000, CLIENT, OTHER) * 2]
    calls.append(api.get("/TrialBalance", OTHER, date="2026-01-31"))
    assert [r.status_code for r in calls] == [200] * 7

    limited_token = contract.check_token(api.request_token(sandbox.client_key_of(80_003)), 429)
    assert limited_token == {"statusCode": "429",
                             "message": "Rate limit is exceeded. Try again in 1 seconds."}
    limited = api.get("/OrganizationSettings", CLIENT)
    assert limited.status_code == 429 and limited.json()["statusCode"] == "429"
    assert not {"retry-after", "x-ratelimit-remaining", "x-rate-limit-remaining"} & set(limited.headers)
    contract.api.validate_response(OpenAPIRequest(limited.request, API_SERVER, "/OrganizationSettings"),
                                   OpenAPIResponse(limited))
    # another subscription key has its own budget (and is refused by the gateway)
    assert api.get("/OrganizationSettings", CLIENT, subscription_key="f" * 32).status_code == 401
    assert sandbox.stats.too_many_requests == 2

    now[0] += 1.0  # the next second
    assert api.get("/OrganizationSettings", CLIENT).status_code == 200
    assert sandbox.stats.by_template["POST /OAuth/Token"] == 4


# ======================================================================================== faults


def test_faults_are_scoped_to_one_tenant_over_admin_http(api, admin, sandbox, contract):
    scope = sandbox.tenant_scope(CLIENT)
    plan = {"faults": [{"kind": "error", "status": 503, "tenant": scope, "path_prefix": "/TrialBalance"}]}
    assert admin.post("/faults", json=plan).status_code == 200
    contract.check_problem(api.get("/TrialBalance", CLIENT, date="2026-01-31"), 503)
    assert api.get("/TrialBalance", OTHER, date="2026-01-31").status_code == 200  # another tenant: healthy
    assert api.get("/GeneralLedgerAccounts", CLIENT).status_code == 200  # another path: healthy
    stats = admin.get("/stats").json()
    assert stats["faults"] == {"error": 1} and stats["by_status"]["503"] == 1
    assert stats["by_template"]["GET /v2/TrialBalance"] == 2
    assert stats["by_tenant"][scope] == 3  # the token call counts for the tenant too
    admin.delete("/faults")
    assert api.get("/TrialBalance", CLIENT, date="2026-01-31").status_code == 200


def test_token_endpoint_faults(api, sandbox):
    sandbox.faults.server_error(500, times=1, path_prefix="/OAuth/Token")
    sandbox.faults.too_many_requests(times=1, tenant=sandbox.tenant_scope(CLIENT))
    key = sandbox.client_key_of(CLIENT)
    assert api.request_token(key).status_code == 500
    injected = api.request_token(key)
    assert injected.status_code == 429 and injected.json()["statusCode"] == "429"
    assert api.request_token(key).status_code == 200


def test_dropped_connection_timeout_malformed_json_and_dropped_field(api, sandbox):
    api.token(CLIENT)
    sandbox.faults.drop_connection(times=1, tenant=sandbox.tenant_scope(CLIENT))
    sandbox.faults.timeout(seconds=0.01, times=1, tenant=sandbox.tenant_scope(CLIENT))
    sandbox.faults.malformed_json(times=1, path_prefix="/TrialBalance")
    sandbox.faults.drop_field("*.Balance", times=1, path_prefix="/TrialBalance")
    with pytest.raises(httpx.RemoteProtocolError):
        api.get("/TrialBalance", CLIENT, date="2026-01-31")
    with pytest.raises(httpx.ReadTimeout):
        api.get("/TrialBalance", CLIENT, date="2026-01-31")
    broken = api.get("/TrialBalance", CLIENT, date="2026-01-31")
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken.content)
    rows = exact(api.get("/TrialBalance", CLIENT, date="2026-01-31"))
    assert rows and all("Balance" not in r and "AccountNo" in r for r in rows)
    assert "Balance" in api.get("/TrialBalance", CLIENT, date="2026-01-31").json()[0]
    statuses = [r.status for r in sandbox.stats.requests(tenant=sandbox.tenant_scope(CLIENT))]
    assert statuses == [200, None, None, 200, 200, 200]  # the token, two without a response, ...


# ======================================================================================== real server


def test_serve_runs_a_real_http_server(sandbox):
    with sandbox.serve() as base_url:
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v2")
        root = base_url.removesuffix("/v2")
        headers = {SUBSCRIPTION_HEADER: sandbox.subscription_key}
        with httpx.Client(base_url=base_url, timeout=5, headers=headers) as http:
            for token_url in (PowerOfficeSandbox.token_url(base_url), root + "/Demo/OAuth/Token"):
                minted = http.post(token_url, data={"grant_type": "client_credentials"},
                                   auth=(sandbox.application_key, sandbox.client_key_of(CLIENT)))
                assert minted.status_code == 200, minted.text
            token = minted.json()["access_token"]
            settings = http.get("/OrganizationSettings", headers={"Authorization": f"Bearer {token}"})
            assert settings.json()["OrganizationNumber"] == sandbox.ledger.by_client_id(CLIENT).org_number
            stats = http.get(root + "/_sandbox/stats").json()
            assert stats["total"] == 3 and stats["by_template"]["POST /OAuth/Token"] == 2

