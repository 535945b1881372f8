"""The Visma eAccounting simulator against its vendor spec (Swagger 2.0 definitions, validated as JSON
Schema) and NOTES.md: identity server, rotation, scopes, paging envelope, balances, errors, limits."""

import asyncio
import datetime as dt
import json
from decimal import Decimal
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import jsonschema
import pytest

from erp_pipelines.sandbox.common import RateLimitPolicy, json_bytes
from erp_pipelines.sandbox.eaccounting import EAccountingSandbox
from erp_pipelines.sandbox.ledger import generate_ledger

SPEC = json.loads((Path(__file__).resolve().parents[2] / "specs/eaccounting/eaccounting-v2-swagger.json").read_text())
SCOPES = "ea:api offline_access ea:accounting_readonly ea:sales_readonly"
REDIRECT = "http://127.0.0.1:9/callback"


def validate(body, definition: str) -> None:
    """A response body against the spec's definition (Swagger 2.0 definitions are JSON Schema draft 4)."""
    document = json.loads(json_bytes(body))
    jsonschema.Draft4Validator({"$ref": f"#/definitions/{definition}", "definitions": SPEC["definitions"]}) \
        .validate(document)


@pytest.fixture
def sandbox():
    return EAccountingSandbox(generate_ledger(3, first_month=dt.date(2025, 6, 1), last_month=dt.date(2026, 2, 1)))


def run(coro):
    return asyncio.run(coro)


async def login(client: httpx.AsyncClient, sandbox, tenant, scope: str = SCOPES) -> dict:
    sandbox.select_company(tenant)
    answer = await client.get("/connect/authorize", params={
        "response_type": "code", "client_id": sandbox.client_id, "redirect_uri": REDIRECT, "scope": scope,
        "state": "s", "prompt": "login", "acr_values": "service:x forceselectcompany:true"})
    assert answer.status_code == 302
    code = parse_qs(urlparse(answer.headers["location"]).query)["code"][0]
    return await token(client, sandbox, grant_type="authorization_code", code=code, redirect_uri=REDIRECT)


async def token(client, sandbox, **form) -> dict:
    answer = await client.post("/connect/token", data=form, auth=(sandbox.client_id, sandbox.client_secret))
    return answer.json() | {"status": answer.status_code}


def asgi(sandbox) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=sandbox.app), base_url="http://ea.test")


def test_every_read_matches_the_vendor_schema_and_the_truth(sandbox):
    tenant = sandbox.ledger.valid_tenants[0]

    async def scenario():
        async with asgi(sandbox) as client:
            tokens = await login(client, sandbox, tenant)
            headers = {"Authorization": f"Bearer {tokens['access_token']}"}
            settings = (await client.get("/v2/companysettings", headers=headers)).json()
            years = (await client.get("/v2/fiscalyears", headers=headers)).json()
            chart = (await client.get(f"/v2/accounts/{years['Data'][0]['Id']}", headers=headers)).json()
            balances = (await client.get("/v2/accountbalances/2026-01-31", params={"$pagesize": 1000},
                                         headers=headers)).json()
            return tokens, settings, years, chart, balances

    tokens, settings, years, chart, balances = run(scenario())
    assert tokens["expires_in"] == 3600 and tokens["refresh_token"]
    validate(settings, "CompanySettingsApi")
    validate(years, "PaginatedResponse[FiscalYearApi]")
    validate(chart, "PaginatedResponse[AccountApi]")
    validate(balances, "PaginatedResponse[AccountBalanceAPI]")
    assert settings["CorporateIdentityNumber"] == tenant.org_number and settings["Name"] == tenant.name
    assert [y["StartDate"][:10] for y in years["Data"]] == ["2025-01-01", "2026-01-01"]
    assert chart["Meta"]["PageSize"] == 50 and chart["Meta"]["CurrentPage"] == 1
    # January 2026: balance sheet closing since the start, profit and loss year to date
    truth = {b.account.number: Decimal(b.closing).scaleb(-2) for b in tenant.balances(dt.date(2026, 1, 1))}
    assert {r["AccountNumber"]: Decimal(str(r["Balance"])) for r in balances["Data"]} == \
        {n: v for n, v in truth.items() if v}


def test_refresh_tokens_rotate_and_die_after_one_use(sandbox):
    async def scenario():
        async with asgi(sandbox) as client:
            first = await login(client, sandbox, sandbox.ledger.valid_tenants[0])
            second = await token(client, sandbox, grant_type="refresh_token", refresh_token=first["refresh_token"])
            reused = await token(client, sandbox, grant_type="refresh_token", refresh_token=first["refresh_token"])
            wrong_client = await client.post("/connect/token", auth=(sandbox.client_id, "wrong"), data={
                "grant_type": "refresh_token", "refresh_token": second["refresh_token"]})
            third = await token(client, sandbox, grant_type="refresh_token", refresh_token=second["refresh_token"])
            return second, reused, wrong_client, third

    second, reused, wrong_client, third = run(scenario())
    assert second["status"] == 200 and second["refresh_token"]
    assert reused == {"error": "invalid_grant", "error_description": reused["error_description"], "status": 400}
    assert wrong_client.json()["error"] == "invalid_client"  # checked before the refresh token is spent
    assert third["status"] == 200 and sandbox.refreshes == 2


def test_one_grant_sees_one_company_and_its_scopes(sandbox):
    one, two = sandbox.ledger.valid_tenants[:2]

    async def scenario():
        async with asgi(sandbox) as client:
            first, second = await login(client, sandbox, one), await login(client, sandbox, two)
            no_sales = await login(client, sandbox, one, scope="ea:api offline_access ea:accounting_readonly")
            names = [(await client.get("/v2/companysettings", headers={"Authorization": f"Bearer {t['access_token']}"}))
                     .json()["Name"] for t in (first, second)]
            refused = await client.get("/v2/companysettings",
                                       headers={"Authorization": f"Bearer {no_sales['access_token']}"})
            return names, refused

    names, refused = run(scenario())
    assert names == [one.name, two.name]
    assert refused.status_code == 403
    assert set(refused.json()) == {"ErrorCode", "DeveloperErrorMessage", "ErrorId"}


def test_paging_envelope_invoicing_variant_revocation_and_expiry(sandbox):
    tenant = sandbox.ledger.valid_tenants[0]

    async def scenario():
        async with asgi(sandbox) as client:
            tokens = await login(client, sandbox, tenant)
            headers = {"Authorization": f"Bearer {tokens['access_token']}"}
            year = (await client.get("/v2/fiscalyears", headers=headers)).json()["Data"][0]["Id"]
            pages = [(await client.get(f"/v2/accounts/{year}", params={"$page": p, "$pagesize": 10}, headers=headers))
                     .json() for p in (1, 4)]
            outside = await client.get("/v2/accountbalances/2019-12-31", headers=headers)
            sandbox.deny_access(tenant)
            denied = await client.get("/v2/accountbalances/2026-01-31", headers=headers)
            sandbox.expire_tokens()
            expired = await client.get("/v2/companysettings", headers=headers)
            sandbox.revoke(tenant)
            revoked = await token(client, sandbox, grant_type="refresh_token", refresh_token=tokens["refresh_token"])
            return pages, outside, denied, expired, revoked

    pages, outside, denied, expired, revoked = run(scenario())
    assert pages[0]["Meta"]["TotalNumberOfPages"] == 4 and len(pages[0]["Data"]) == 10
    assert pages[1]["Meta"]["CurrentPage"] == 4 and len(pages[1]["Data"]) == len(tenant.accounts) - 30
    assert outside.status_code == 404 and outside.json()["ErrorCode"] == 3000
    assert denied.status_code == 403 and "Invoicing" in denied.json()["DeveloperErrorMessage"]
    assert expired.status_code == 401
    assert revoked["error"] == "invalid_grant"


def test_the_limit_is_per_company_and_endpoint_with_error_4010(sandbox):
    sandbox.set_rate_limit(RateLimitPolicy(limit=2, window_seconds=60))
    one, two = sandbox.ledger.valid_tenants[:2]

    async def scenario():
        async with asgi(sandbox) as client:
            a, b = await login(client, sandbox, one), await login(client, sandbox, two)
            get = lambda t, path: client.get(path, headers={"Authorization": f"Bearer {t['access_token']}"})
            same = [(await get(a, "/v2/accountbalances/2026-01-31")).status_code,
                    (await get(a, "/v2/accountbalances/2025-12-31")).status_code]
            third = await get(a, "/v2/accountbalances/2025-11-30")
            other_endpoint = (await get(a, "/v2/fiscalyears")).status_code
            other_company = (await get(b, "/v2/accountbalances/2026-01-31")).status_code
            return same, third, other_endpoint, other_company

    same, third, other_endpoint, other_company = run(scenario())
    assert same == [200, 200] and other_endpoint == 200 and other_company == 200
    assert third.status_code == 429 and third.json()["ErrorCode"] == 4010
    assert "600 per Minute" in third.json()["DeveloperErrorMessage"]
