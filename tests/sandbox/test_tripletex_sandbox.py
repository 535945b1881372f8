"""The Tripletex simulator: contract tests against tripletex-openapi.json and behaviour tests
against the truth ledger, the shared fault/rate-limit machinery and the admin controls."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import time
from decimal import Decimal

import httpx
import pytest

from erp_pipelines.model import add_months
from erp_pipelines.sandbox.common import RateLimitPolicy, json_bytes
from erp_pipelines.sandbox.ledger import CHART
from erp_pipelines.sandbox.tripletex import (
    DEFAULT_ACCOUNTANT_EMPLOYEE_TOKEN,
    DEFAULT_CONSUMER_TOKEN,
    FIRM_ID,
    FIRM_ORG_NUMBER,
    TripletexSandbox,
    balance_window,
    parse_fields,
)

TODAY = dt.date(2026, 4, 15)  # the sandbox fixture's date
COMPANY_KEY, COMPANY_KEY_CLIENT = "sandbox-company-key-80001", 80_001  # the fixture's company key
CLIENT = 80_001  # a valid tenant
OTHER = 80_002
BALANCE_FIELDS = "account(number,name),balanceIn,balanceChange,balanceOut,startDate,endDate"


def kroner(ore: int) -> Decimal:
    return Decimal(ore) / 100


def exact_values(response: httpx.Response) -> list[dict]:
    """The response's values with every number parsed as an exact Decimal (no float in between)."""
    return json.loads(response.content, parse_float=Decimal)["values"]


def month_window(month: dt.date) -> dict[str, str]:
    return {"dateFrom": month.isoformat(), "dateTo": add_months(month, 1).isoformat()}


def run(coroutine):
    return asyncio.run(coroutine)


def asgi_client(sandbox: TripletexSandbox, **kwargs) -> httpx.AsyncClient:
    """What connector tests use: an AsyncClient over httpx.ASGITransport."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=sandbox.app),
                             base_url="http://tripletex.test/v2", **kwargs)


async def async_login(client: httpx.AsyncClient, employee_token: str = DEFAULT_ACCOUNTANT_EMPLOYEE_TOKEN) -> str:
    response = await client.post("/token/session/:create", json={
        "consumerToken": DEFAULT_CONSUMER_TOKEN, "employeeToken": employee_token,
        "expirationDate": (TODAY + dt.timedelta(days=7)).isoformat()})
    assert response.status_code == 201, response.text
    return response.json()["value"]["token"]


# ======================================================================================== contract


def test_contract_session_create_post_and_legacy_put(api, contract):
    body = contract.check(api.http.post("/token/session/:create", json={
        "consumerToken": DEFAULT_CONSUMER_TOKEN,
        "employeeToken": DEFAULT_ACCOUNTANT_EMPLOYEE_TOKEN,
        "expirationDate": "2026-04-16",
    }), "/token/session/:create", 201)
    assert body["value"]["token"] and body["value"]["expirationDate"] == "2026-04-16"

    legacy = contract.check(api.http.put("/token/session/:create", params={
        "consumerToken": DEFAULT_CONSUMER_TOKEN,
        "employeeToken": DEFAULT_ACCOUNTANT_EMPLOYEE_TOKEN,
        "expirationDate": "2026-04-22",
    }), "/token/session/:create", 200)
    assert legacy["value"]["token"] != body["value"]["token"]
    # both tokens work
    for token in (body["value"]["token"], legacy["value"]["token"]):
        assert api.http.get("/token/session/>whoAmI", auth=("0", token)).status_code == 200


def test_contract_who_am_i_as_firm_and_as_client(api, contract, ledger):
    firm = contract.check(api.get("/token/session/>whoAmI"), "/token/session/>whoAmI")["value"]
    assert firm["companyId"] == FIRM_ID
    assert firm["company"] == {"id": FIRM_ID, "url": firm["company"]["url"]}  # nested default {id,url}
    assert firm["employeeIsProxy"] is False

    response = api.get("/token/session/>whoAmI", CLIENT,
                       fields="companyId,employeeIsProxy,company(id,name,organizationNumber)")
    client = contract.check(response, "/token/session/>whoAmI")["value"]
    tenant = ledger.by_client_id(CLIENT)
    assert client == {
        "companyId": CLIENT,
        "employeeIsProxy": True,
        "company": {"id": CLIENT, "name": tenant.name, "organizationNumber": tenant.org_number},
    }


def test_contract_with_login_access_paged(api, contract, ledger):
    seen = []
    for start in range(0, 12, 4):
        body = contract.check(
            api.get("/company/>withLoginAccess", **{"from": start, "count": 4}), "/company/>withLoginAccess"
        )
        assert body["from"] == start and body["count"] == len(body["values"]) <= 4
        assert isinstance(body["versionDigest"], str)
        seen += body["values"]
    assert [c["id"] for c in seen] == [t.erp_client_id for t in ledger.tenants]
    by_id = {c["id"]: c for c in seen}
    for tenant in ledger.tenants:
        client = by_id[tenant.erp_client_id]
        assert (client["name"], client["organizationNumber"], client["type"]) == (
            tenant.name, tenant.org_number, tenant.company_type)
    assert by_id[80_005]["organizationNumber"] == ""  # the fixture without a number: "" not null

    explicit = contract.check(api.get("/company/>withLoginAccess", fields="id,name,organizationNumber,type"),
                              "/company/>withLoginAccess")
    assert set(explicit["values"][0]) == {"id", "name", "organizationNumber", "type"}


def test_contract_company_get(api, contract, ledger):
    body = contract.check(api.get(f"/company/{CLIENT}", CLIENT), "/company/{id}")["value"]
    assert (body["id"], body["organizationNumber"]) == (CLIENT, ledger.by_client_id(CLIENT).org_number)
    contract.check_error(api.get(f"/company/{OTHER}", CLIENT), 403, 9000)
    contract.check_error(api.get("/company/424242", CLIENT), 404, 6000)
    contract.check_error(api.get("/company/abc", CLIENT), 400, 12000)


def test_contract_ledger_account(api, contract, ledger):
    body = contract.check(api.get("/ledger/account", CLIENT), "/ledger/account")
    tenant = ledger.by_client_id(CLIENT)
    assert [(a["number"], a["name"], a["type"]) for a in body["values"]] == [
        (a.number, a.name, a.type) for a in sorted(tenant.accounts, key=lambda a: a.number)]
    assert all(isinstance(a["saftCode"], str) and a["isInactive"] is False for a in body["values"])

    some = contract.check(api.get("/ledger/account", CLIENT, number="1920,3000", fields="id,number,name,type"),
                          "/ledger/account")
    assert [a["number"] for a in some["values"]] == [1920, 3000]
    assert set(some["values"][0]) == {"id", "number", "name", "type"}
    assert api.get("/ledger/account", CLIENT, isInactive="true").json()["values"] == []


@pytest.mark.parametrize("include_unmoved", [False, True])
def test_contract_balance_sheet(api, contract, include_unmoved):
    params = {**month_window(dt.date(2026, 2, 1)), "fields": BALANCE_FIELDS,
              "includeActiveAccountsWithoutMovements": str(include_unmoved).lower()}
    body = contract.check(api.get("/balanceSheet", CLIENT, **params), "/balanceSheet")
    assert body["values"] and all(set(row["account"]) == {"number", "name"} for row in body["values"])
    default_fields = contract.check(api.get("/balanceSheet", CLIENT, **month_window(dt.date(2026, 2, 1))),
                                    "/balanceSheet")
    assert set(default_fields["values"][0]["account"]) == {"id", "url"}


def test_contract_errors(api, contract, sandbox):
    # 422: wrong consumer token (NOTES pitfall 1), past expiration date
    wrong = contract.check_error(api.http.post("/token/session/:create", json={
        "consumerToken": "prod-token", "employeeToken": DEFAULT_ACCOUNTANT_EMPLOYEE_TOKEN,
        "expirationDate": "2026-05-01"}), 422, 18000)
    assert "The consumer token is invalid or does not exist." in [m["message"] for m in wrong["validationMessages"]]
    contract.check_error(api.http.put("/token/session/:create", params={
        "consumerToken": DEFAULT_CONSUMER_TOKEN, "employeeToken": DEFAULT_ACCOUNTANT_EMPLOYEE_TOKEN,
        "expirationDate": TODAY.isoformat()}), 422, 18000)
    # 401: unknown session, unknown username
    contract.check_error(api.http.get("/token/session/>whoAmI", auth=("0", "no-such-token")), 401, 3000)
    contract.check_error(api.http.get("/token/session/>whoAmI"), 401, 3000)
    bad_user = contract.check_error(api.get("/ledger/account", 99), 401, 3000)
    assert bad_user["developerMessage"].startswith(
        "Authorization header has invalid username: 99. Should be a customer id or 0 for default.")
    # 403: the accountant key as its own firm
    contract.check_error(api.get("/ledger/account", 0), 403, 9000)
    # 422: missing dateFrom, count too large
    contract.check_error(api.get("/balanceSheet", CLIENT, dateTo="2026-02-01"), 422, 21000)
    contract.check_error(api.get("/ledger/account", CLIENT, count=10_001), 422, 23000)
    # 400: illegal field
    contract.check_error(api.get("/ledger/account", CLIENT, fields="number,nope"), 400, 11000)
    # 404 for an unknown endpoint
    contract.check_error(api.get("/ledger/nothing", CLIENT), 404, 6000)
    # 429
    sandbox.set_rate_limit(RateLimitPolicy(limit=1, window_seconds=60))
    api.get("/ledger/account", CLIENT)
    contract.check_error(api.get("/ledger/account", CLIENT), 429)


# ======================================================================================== auth and access


def test_session_expires_at_midnight_of_expiration_date(api, sandbox, contract):
    token = api.login(expiration=TODAY + dt.timedelta(days=1))
    assert api.http.get("/token/session/>whoAmI", auth=("0", token)).status_code == 200
    sandbox.today = TODAY + dt.timedelta(days=1)
    contract.check_error(api.http.get("/token/session/>whoAmI", auth=("0", token)), 401, 3000)


def test_expire_all_sessions(api, admin, contract):
    token = api.login()
    assert admin.post("/tripletex/sessions/expire").json() == {"expired": 1}
    contract.check_error(api.http.get("/token/session/>whoAmI", auth=("0", token)), 401, 3000)
    api.login()  # a fresh session works again
    assert api.get("/token/session/>whoAmI").status_code == 200


def test_company_key_acts_as_its_own_company(api, contract):
    who = contract.check(api.get("/token/session/>whoAmI", 0, employee_token=COMPANY_KEY), "/token/session/>whoAmI")
    assert who["value"]["companyId"] == COMPANY_KEY_CLIENT and who["value"]["employeeIsProxy"] is False
    clients = contract.check(api.get("/company/>withLoginAccess", 0, employee_token=COMPANY_KEY),
                             "/company/>withLoginAccess")
    assert clients["values"] == [] and isinstance(clients["versionDigest"], str)
    assert api.get("/ledger/account", 0, employee_token=COMPANY_KEY).status_code == 200
    contract.check_error(api.get("/ledger/account", OTHER, employee_token=COMPANY_KEY), 401, 3000)


def test_revoke_and_grant_client_access_over_admin_http(api, admin, contract):
    assert admin.post(f"/tripletex/clients/{CLIENT}/revoke").json()["login_access"] is False
    listed = [c["id"] for c in api.get("/company/>withLoginAccess").json()["values"]]
    assert CLIENT not in listed and OTHER in listed
    contract.check_error(api.get("/token/session/>whoAmI", CLIENT), 401, 3000)

    admin.post(f"/tripletex/clients/{CLIENT}/grant")
    assert CLIENT in [c["id"] for c in api.get("/company/>withLoginAccess").json()["values"]]
    assert api.get("/token/session/>whoAmI", CLIENT).status_code == 200
    assert admin.post("/tripletex/clients/999/grant").status_code == 404


def test_client_without_api_access_is_listed_but_forbidden(api, admin, sandbox, contract):
    response = admin.put(f"/tripletex/clients/{CLIENT}/api-access", json={"enabled": False})
    assert response.json()["api_access"] is False
    assert CLIENT in [c["id"] for c in api.get("/company/>withLoginAccess").json()["values"]]
    for path in ("/token/session/>whoAmI", "/ledger/account", f"/company/{CLIENT}"):
        contract.check_error(api.get(path, CLIENT), 403, 9000)
    assert api.get("/ledger/account", OTHER).status_code == 200  # the others are unaffected
    sandbox.set_api_access(CLIENT, True)
    assert api.get("/ledger/account", CLIENT).status_code == 200


def test_newly_added_client_is_listed_and_serves_its_truth(api, admin, ledger):
    created = admin.post("/tripletex/clients", json={"name": "Nyoppstartet Bakeri AS"})
    assert created.status_code == 201
    new_id = created.json()["id"]
    assert new_id == max(t.erp_client_id for t in ledger.tenants)
    tenant = ledger.by_client_id(new_id)
    listed = {c["id"]: c for c in api.get("/company/>withLoginAccess").json()["values"]}
    assert listed[new_id]["organizationNumber"] == tenant.org_number
    assert tenant.org_number not in {t.org_number for t in ledger.tenants if t is not tenant}
    month = dt.date(2026, 3, 1)
    rows = exact_values(api.get("/balanceSheet", new_id, **month_window(month), fields=BALANCE_FIELDS,
                                includeActiveAccountsWithoutMovements="true"))
    assert {r["account"]["number"]: r["balanceOut"] for r in rows} == {
        b.account.number: kroner(b.closing) for b in tenant.balances(month)}


def test_impersonation_answers_with_another_company(api, admin, ledger):
    admin.put(f"/tripletex/clients/{CLIENT}/impersonate", json={"as": OTHER})
    who = api.get("/token/session/>whoAmI", CLIENT, fields="companyId,company(organizationNumber)").json()["value"]
    assert who == {"companyId": OTHER, "company": {"organizationNumber": ledger.by_client_id(OTHER).org_number}}
    assert api.get(f"/company/{CLIENT}", CLIENT).json()["value"]["id"] == OTHER
    other_rows = api.get("/balanceSheet", OTHER, **month_window(dt.date(2026, 1, 1))).json()["values"]
    assert api.get("/balanceSheet", CLIENT, **month_window(dt.date(2026, 1, 1))).json()["values"] == other_rows
    admin.delete(f"/tripletex/clients/{CLIENT}/impersonate")
    assert api.get("/token/session/>whoAmI", CLIENT).json()["value"]["companyId"] == CLIENT


# ======================================================================================== balances


def test_balance_window_matches_the_truth_ledger_for_every_month(ledger):
    for tenant in ledger.tenants[:3]:
        for month in tenant.months:
            window = balance_window(tenant, month, add_months(month, 1))
            assert window == {b.account.number: (b.opening, b.movement) for b in tenant.balances(month)}


def test_balance_sheet_equals_truth_to_the_ore(api, ledger):
    tenant = ledger.by_client_id(CLIENT)
    for month in (dt.date(2025, 1, 1), dt.date(2025, 12, 1), dt.date(2026, 1, 1), dt.date(2026, 3, 1)):
        response = api.get("/balanceSheet", CLIENT, **month_window(month), fields=BALANCE_FIELDS,
                           includeActiveAccountsWithoutMovements="true")
        rows = {r["account"]["number"]: r for r in exact_values(response)}
        floats = {r["account"]["number"]: r for r in response.json()["values"]}
        truth = tenant.balances(month)
        assert set(rows) == {b.account.number for b in truth}
        for b in truth:
            row = rows[b.account.number]
            assert (row["balanceIn"], row["balanceChange"], row["balanceOut"]) == (
                kroner(b.opening), kroner(b.movement), kroner(b.closing)), b.account
            assert Decimal(str(floats[b.account.number]["balanceOut"])) == kroner(b.closing)
            assert (row["startDate"], row["endDate"]) == (month.isoformat(), add_months(month, 1).isoformat())
        assert sum(r["balanceOut"] for r in rows.values()) == 0  # the trial balance balances


def test_balance_sheet_over_several_months_sums_the_months(api, ledger):
    tenant = ledger.by_client_id(CLIENT)
    months = [dt.date(2025, 10, 1), dt.date(2025, 11, 1), dt.date(2025, 12, 1)]
    rows = {r["account"]["number"]: r for r in exact_values(api.get(
        "/balanceSheet", CLIENT, dateFrom="2025-10-01", dateTo="2026-01-01", fields=BALANCE_FIELDS,
        includeActiveAccountsWithoutMovements="true"))}
    for account in tenant.accounts:
        per_month = [next(b for b in tenant.balances(m) if b.account == account) for m in months]
        assert rows[account.number]["balanceIn"] == kroner(per_month[0].opening)
        assert rows[account.number]["balanceChange"] == kroner(sum(b.movement for b in per_month))


def test_date_to_is_exclusive(api, ledger):
    tenant = ledger.by_client_id(CLIENT)
    last_day = dt.date(2026, 2, 28)  # the ledger posts month-end entries on the 28th
    on_last_day: dict[int, int] = {}
    for voucher in tenant.vouchers:
        if voucher.date == last_day:
            for number, amount in voucher.lines:
                on_last_day[number] = on_last_day.get(number, 0) + amount
    assert on_last_day
    params = {"dateFrom": "2026-02-01", "includeActiveAccountsWithoutMovements": "true", "fields": BALANCE_FIELDS}
    short = {r["account"]["number"]: r for r in exact_values(api.get("/balanceSheet", CLIENT, dateTo="2026-02-28",
                                                                      **params))}
    full = {r["account"]["number"]: r for r in exact_values(api.get("/balanceSheet", CLIENT, dateTo="2026-03-01",
                                                                     **params))}
    for number in full:
        difference = full[number]["balanceChange"] - short[number]["balanceChange"]
        assert difference == kroner(on_last_day.get(number, 0))


def test_accounts_without_movement_are_omitted_unless_asked_for(api, ledger):
    window = month_window(dt.date(2026, 2, 1))
    default = {r["account"]["number"] for r in api.get("/balanceSheet", CLIENT, **window,
                                                       fields="account(number)").json()["values"]}
    everything = exact_values(api.get("/balanceSheet", CLIENT, **window, fields=BALANCE_FIELDS,
                                      includeActiveAccountsWithoutMovements="true"))
    assert len(everything) == len(ledger.by_client_id(CLIENT).accounts)
    unmoved = {r["account"]["number"] for r in everything if r["balanceChange"] == 0}
    assert 2000 in unmoved  # share capital: opening balance, no movement
    assert default == {r["account"]["number"] for r in everything} - unmoved


def test_account_number_to_is_exclusive(api):
    rows = api.get("/balanceSheet", CLIENT, **month_window(dt.date(2026, 1, 1)), accountNumberFrom=1900,
                   accountNumberTo=2000, includeActiveAccountsWithoutMovements="true",
                   fields="account(number)").json()["values"]
    assert [r["account"]["number"] for r in rows] == [1900, 1920]


# ======================================================================================== general ledger


LEDGER_FIELDS = "account(number),openingBalance,sumAmount,closingBalance"


def ledger_totals(response: httpx.Response) -> dict[int, tuple[Decimal, Decimal, Decimal]]:
    return {r["account"]["number"]: (r["openingBalance"], r["sumAmount"], r["closingBalance"])
            for r in exact_values(response)}


def test_contract_ledger(api, contract):
    body = contract.check(api.get("/ledger", CLIENT, **month_window(dt.date(2026, 2, 1))), "/ledger")
    assert body["values"] and set(body["values"][0]["account"]) == {"id", "url"}  # nested default {id, url}
    chosen = contract.check(api.get("/ledger", CLIENT, **month_window(dt.date(2026, 2, 1)), fields=LEDGER_FIELDS),
                            "/ledger")
    assert set(chosen["values"][0]) == {"account", "openingBalance", "sumAmount", "closingBalance"}
    contract.check_error(api.get("/ledger", CLIENT, dateFrom="2026-02-01"), 422, 21000)
    contract.check_error(api.get("/ledger", CLIENT, dateFrom="2026-02-01", dateTo="2026-02-01"), 422, 18000)


def test_ledger_lists_the_accounts_with_postings_and_agrees_with_the_balance_sheet(api, ledger):
    tenant = ledger.by_client_id(CLIENT)
    for month in (dt.date(2025, 12, 1), dt.date(2026, 1, 1), dt.date(2026, 3, 1)):
        totals = ledger_totals(api.get("/ledger", CLIENT, **month_window(month), fields=LEDGER_FIELDS))
        window = add_months(month, 1)
        posted = {n for v in tenant.vouchers if month <= v.date < window for n, _ in v.lines}
        assert set(totals) == posted
        truth = {b.account.number: b for b in tenant.balances(month)}
        for number, (opening, movement, closing) in totals.items():
            b = truth[number]
            assert (opening, movement, closing) == (kroner(b.opening), kroner(b.movement), kroner(b.closing))


def test_ledger_is_paged_like_every_list(api):
    window = month_window(dt.date(2026, 2, 1))
    full = api.get("/ledger", CLIENT, **window, fields=LEDGER_FIELDS).json()
    pages = [api.get("/ledger", CLIENT, **window, fields=LEDGER_FIELDS, **{"from": start, "count": 5}).json()
             for start in range(0, len(full["values"]) + 5, 5)]
    assert [r for p in pages for r in p["values"]] == full["values"]
    assert pages[-1]["count"] == 0 and len({p["versionDigest"] for p in pages}) == 1


def test_ledger_skew_makes_only_the_ledger_disagree_over_admin_http(api, admin, ledger):
    before = {m: ledger_totals(api.get("/ledger", CLIENT, **month_window(m), fields=LEDGER_FIELDS))
              for m in (dt.date(2026, 1, 1), dt.date(2026, 2, 1), dt.date(2026, 3, 1))}
    sheet = api.get("/balanceSheet", CLIENT, **month_window(dt.date(2026, 2, 1)), fields=BALANCE_FIELDS).json()
    other = api.get("/ledger", OTHER, **month_window(dt.date(2026, 2, 1)), fields=LEDGER_FIELDS).json()
    response = admin.post(f"/tripletex/clients/{CLIENT}/ledger-skew",
                          json={"account": 1920, "amount_ore": 12_345, "date": "2026-02-10"})
    assert response.status_code == 200, response.text
    after = {m: ledger_totals(api.get("/ledger", CLIENT, **month_window(m), fields=LEDGER_FIELDS)) for m in before}
    skew = Decimal("123.45")
    assert after[dt.date(2026, 1, 1)] == before[dt.date(2026, 1, 1)]
    opening, movement, closing = before[dt.date(2026, 2, 1)][1920]
    assert after[dt.date(2026, 2, 1)][1920] == (opening, movement + skew, closing + skew)
    opening, movement, closing = before[dt.date(2026, 3, 1)][1920]
    assert after[dt.date(2026, 3, 1)][1920] == (opening + skew, movement, closing + skew)
    assert {n: t for n, t in after[dt.date(2026, 2, 1)].items() if n != 1920} == {
        n: t for n, t in before[dt.date(2026, 2, 1)].items() if n != 1920}
    assert api.get("/balanceSheet", CLIENT, **month_window(dt.date(2026, 2, 1)),
                   fields=BALANCE_FIELDS).json() == sheet  # the balance sheet is untouched
    assert api.get("/ledger", OTHER, **month_window(dt.date(2026, 2, 1)), fields=LEDGER_FIELDS).json() == other

    assert admin.post(f"/tripletex/clients/{CLIENT}/ledger-skew",
                      json={"account": 4242, "amount_ore": 1, "date": "2026-02-10"}).status_code == 400
    assert admin.post(f"/tripletex/clients/{CLIENT}/ledger-skew", json={"account": 1920}).status_code == 400
    admin.delete(f"/tripletex/clients/{CLIENT}/ledger-skew")
    assert ledger_totals(api.get("/ledger", CLIENT, **month_window(dt.date(2026, 3, 1)),
                                 fields=LEDGER_FIELDS)) == before[dt.date(2026, 3, 1)]


# ======================================================================================== paging and fields


def test_paging_envelope_and_limits(api):
    full = api.get("/ledger/account", CLIENT).json()
    assert full["count"] == len(full["values"]) == full["fullResultSize"] == len(CHART)
    pages = [api.get("/ledger/account", CLIENT, **{"from": start, "count": 7}).json() for start in range(0, 35, 7)]
    assert [p["count"] for p in pages] == [7, 7, 7, 7, len(CHART) - 28]
    assert [a["number"] for p in pages for a in p["values"]] == [a["number"] for a in full["values"]]
    assert len({p["versionDigest"] for p in pages}) == 1
    assert api.get("/ledger/account", CLIENT, count=10_000).status_code == 200
    assert api.get("/ledger/account", CLIENT, count=10_001).json()["code"] == 23000


def test_page_shifts_when_the_list_changes_while_paging(api, admin, sandbox):
    sandbox.mutate_during_paging("/ledger/account", "insert", after_requests=1, tenant=CLIENT)
    first = api.get("/ledger/account", CLIENT, count=10, fields="number").json()
    second = api.get("/ledger/account", CLIENT, count=10, **{"from": 10}, fields="number").json()
    # an account was inserted at the front: the second page repeats the first page's last element
    assert second["values"][0] == first["values"][-1]
    assert second["versionDigest"] != first["versionDigest"]

    sandbox.clear_paging_mutations()
    admin.post("/tripletex/paging-mutations", json={"path": "/company/>withLoginAccess", "action": "remove"})
    page1 = api.get("/company/>withLoginAccess", count=3, fields="id").json()["values"]
    page2 = api.get("/company/>withLoginAccess", count=3, **{"from": 3}, fields="id").json()["values"]
    assert [c["id"] for c in page1 + page2] == [80_000, 80_001, 80_002, 80_004, 80_005, 80_006]  # 80_003 skipped


def test_fields_selection_syntax():
    assert parse_fields("id,account(number,name),*") == {"id": None, "account": {"number": None, "name": None},
                                                         "*": None}
    assert parse_fields(" ") is None
    assert parse_fields("a(b(c,d),e)") == {"a": {"b": {"c": None, "d": None}, "e": None}}


def test_nested_fields_and_star(api):
    row = api.get("/balanceSheet", CLIENT, **month_window(dt.date(2026, 1, 1)),
                  fields="*,account(number,currency(code))").json()["values"][0]
    assert set(row) == {"account", "balanceIn", "balanceChange", "balanceOut", "startDate", "endDate"}
    assert row["account"] == {"number": row["account"]["number"], "currency": {"code": "NOK"}}


# ======================================================================================== rate limits


def test_rate_limit_429_without_reset_header(api, sandbox, contract):
    clock = [1000.0]
    sandbox.rate_limiter.clock = lambda: clock[0]
    sandbox.set_rate_limit(RateLimitPolicy(limit=3, window_seconds=60))
    api.login()
    api.login(COMPANY_KEY)  # logins are "anonymous": not counted against the employee keys
    ok = [api.get("/ledger/account", CLIENT) for _ in range(3)]
    assert [r.headers["X-Rate-Limit-Remaining"] for r in ok] == ["2", "1", "0"]
    assert all(r.headers["X-Rate-Limit-Limit"] == "3" and r.headers["X-Rate-Limit-Reset"] == "60" for r in ok)
    limited = api.get("/ledger/account", CLIENT)
    contract.check_error(limited, 429)
    assert "X-Rate-Limit-Reset" not in limited.headers and "Retry-After" not in limited.headers  # NOTES §5
    assert limited.headers["X-Rate-Limit-Remaining"] == "0"
    # per credential: the company's own key has its own window
    assert api.get("/ledger/account", 0, employee_token=COMPANY_KEY).status_code == 200
    assert sandbox.stats.too_many_requests == 1
    clock[0] += 60  # the window ends
    assert api.get("/ledger/account", CLIENT).status_code == 200


def test_rate_limit_can_send_reset_and_retry_after(api, admin, sandbox):
    response = admin.put("/rate-limit", json={"limit": 1, "window_seconds": 30, "reset_header_on_429": True,
                                              "retry_after_on_429": True})
    assert response.json()["limit"] == 1
    api.get("/ledger/account", CLIENT)
    limited = api.get("/ledger/account", CLIENT)
    assert limited.status_code == 429
    assert 0 < int(limited.headers["X-Rate-Limit-Reset"]) <= 30 and int(limited.headers["Retry-After"]) <= 30


def test_max_in_flight_cap(sandbox):
    sandbox.set_rate_limit(RateLimitPolicy(max_in_flight=2))
    sandbox.faults.latency(50, path_prefix="/ledger/account")

    async def scenario():
        async with asgi_client(sandbox) as client:
            token = await async_login(client)
            return await asyncio.gather(*[client.get("/ledger/account", auth=(str(CLIENT), token)) for _ in range(5)])

    statuses = sorted(r.status_code for r in run(scenario()))
    assert statuses == [200, 200, 429, 429, 429]
    assert sandbox.stats.peak_in_flight >= 2 and sandbox.stats.too_many_requests == 3


# ======================================================================================== faults


def test_faults_are_scoped_to_one_tenant_over_admin_http(api, admin, sandbox, contract):
    plan = {"faults": [{"kind": "error", "status": 503, "tenant": str(CLIENT), "path_prefix": "/balanceSheet"}]}
    assert admin.post("/faults", json=plan).status_code == 200
    window = month_window(dt.date(2026, 1, 1))
    contract.check_error(api.get("/balanceSheet", CLIENT, **window), 503, 1000)
    assert api.get("/balanceSheet", OTHER, **window).status_code == 200  # another tenant: healthy
    assert api.get("/ledger/account", CLIENT).status_code == 200  # another path: healthy
    stats = admin.get("/stats").json()
    assert stats["faults"] == {"error": 1} and stats["by_status"]["503"] == 1
    assert stats["by_template"]["GET /v2/balanceSheet"] == 2
    admin.delete("/faults")
    assert api.get("/balanceSheet", CLIENT, **window).status_code == 200
    assert admin.post("/stats/reset").json()["total"] == 0


def test_next_n_server_errors_then_healthy(api, sandbox):
    api.login()
    sandbox.faults.server_error(502, times=2)
    statuses = [api.get("/ledger/account", CLIENT).status_code for _ in range(3)]
    assert statuses == [502, 502, 200]


def test_injected_429_with_and_without_retry_after(api, sandbox):
    api.login()
    sandbox.faults.too_many_requests(times=1)
    sandbox.faults.too_many_requests(times=1, retry_after=2, reset_seconds=7)
    bare, hinted = api.get("/ledger/account", CLIENT), api.get("/ledger/account", CLIENT)
    assert bare.status_code == hinted.status_code == 429
    assert "Retry-After" not in bare.headers and "X-Rate-Limit-Reset" not in bare.headers
    assert hinted.headers["Retry-After"] == "2" and hinted.headers["X-Rate-Limit-Reset"] == "7"
    assert api.get("/ledger/account", CLIENT).status_code == 200


def test_dropped_connection_timeout_and_latency_through_asgi_transport(sandbox):
    sandbox.faults.drop_connection(times=1, tenant=CLIENT)
    sandbox.faults.timeout(seconds=0.01, times=1, tenant=CLIENT)
    sandbox.faults.latency(30, tenant=OTHER)

    async def scenario():
        async with asgi_client(sandbox) as client:
            token = await async_login(client)
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/ledger/account", auth=(str(CLIENT), token))
            with pytest.raises(httpx.ReadTimeout):
                await client.get("/ledger/account", auth=(str(CLIENT), token))
            assert (await client.get("/ledger/account", auth=(str(CLIENT), token))).status_code == 200
            started = time.perf_counter()
            assert (await client.get("/ledger/account", auth=(str(OTHER), token))).status_code == 200
            return time.perf_counter() - started

    assert run(scenario()) >= 0.03
    assert [r.status for r in sandbox.stats.requests(tenant=CLIENT)] == [None, None, 200]


def test_malformed_json_and_dropped_field(api, sandbox):
    sandbox.faults.malformed_json(times=1, path_prefix="/balanceSheet")
    sandbox.faults.drop_field("values.*.balanceOut", times=1, path_prefix="/balanceSheet")
    window = month_window(dt.date(2026, 1, 1))
    broken = api.get("/balanceSheet", CLIENT, **window)
    assert broken.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken.content)
    assert int(broken.headers["content-length"]) == len(broken.content)
    missing = api.get("/balanceSheet", CLIENT, **window)
    values = exact_values(missing)
    assert values and all("balanceOut" not in r and "balanceIn" in r for r in values)
    assert isinstance(values[0]["balanceIn"], Decimal)  # re-serialised without float rounding
    assert "balanceOut" in api.get("/balanceSheet", CLIENT, **window).json()["values"][0]


def test_probabilistic_faults_are_reproducible(ledger):
    def statuses(seed: int) -> list[int]:
        sandbox = TripletexSandbox(ledger, today=TODAY, fault_seed=seed)
        sandbox.faults.server_error(500, probability=0.5, path_prefix="/ledger")

        async def scenario():
            async with asgi_client(sandbox) as client:
                token = await async_login(client)
                return [(await client.get("/ledger/account", auth=(str(CLIENT), token))).status_code
                        for _ in range(12)]

        return run(scenario())

    first = statuses(7)
    assert first == statuses(7) and {200, 500} == set(first)


def test_json_bytes_keeps_decimal_digits():
    assert json_bytes({"a": Decimal("1234.50"), "b": [Decimal("-0.01"), 1, None, "ø"]}) == (
        '{"a":1234.50,"b":[-0.01,1,null,"ø"]}'.encode())


# ======================================================================================== real servers


def test_serve_runs_a_real_http_server(sandbox):
    sandbox.faults.drop_connection(times=1, path_prefix="/company")
    with sandbox.serve() as base_url:
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v2")
        with httpx.Client(base_url=base_url, timeout=5) as client:
            created = client.post("/token/session/:create", json={
                "consumerToken": DEFAULT_CONSUMER_TOKEN, "employeeToken": DEFAULT_ACCOUNTANT_EMPLOYEE_TOKEN,
                "expirationDate": "2026-04-20"})
            token = created.json()["value"]["token"]
            who = client.get("/token/session/%3EwhoAmI", auth=("0", token))
            assert who.json()["value"]["company"]["id"] == FIRM_ID and who.headers["x-tlx-request-id"]
            with pytest.raises(httpx.RemoteProtocolError):
                client.get("/company/>withLoginAccess", auth=("0", token))
            assert client.get("/company/>withLoginAccess", auth=("0", token)).status_code == 200
            stats = client.get(base_url.removesuffix("/v2") + "/_sandbox/stats").json()
            assert stats["total"] == 4 and stats["faults"] == {"drop_connection": 1}


def test_cli_serves_and_prints_credentials():
    process = subprocess.Popen(
        [sys.executable, "-m", "erp_pipelines.sandbox", "serve", "--erp", "tripletex", "--port", "0",
         "--tenants", "2", "--no-fixtures"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        banner = [process.stdout.readline() for _ in range(4)]
        base_url = banner[0].split()[-1]
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v2")
        assert DEFAULT_CONSUMER_TOKEN in banner[1] and DEFAULT_ACCOUNTANT_EMPLOYEE_TOKEN in banner[2]
        created = httpx.post(f"{base_url}/token/session/:create", timeout=5, json={
            "consumerToken": DEFAULT_CONSUMER_TOKEN, "employeeToken": DEFAULT_ACCOUNTANT_EMPLOYEE_TOKEN,
            "expirationDate": (dt.date.today() + dt.timedelta(days=2)).isoformat()})
        token = created.json()["value"]["token"]
        clients = httpx.get(f"{base_url}/company/>withLoginAccess", auth=("0", token), timeout=5).json()
        assert len(clients["values"]) == 2
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_firm_org_number_is_valid():
    from erp_pipelines.model import normalise_tenant_id

    assert normalise_tenant_id(FIRM_ORG_NUMBER) == FIRM_ORG_NUMBER


def test_fixture_constants_match(sandbox, company_key):
    assert sandbox.today == TODAY and company_key == (COMPANY_KEY, COMPANY_KEY_CLIENT)
