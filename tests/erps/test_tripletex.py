"""Tripletex connector against the in-process sandbox (its responses are validated against the
vendor spec in tests/sandbox)."""

import asyncio
import datetime as dt
from dataclasses import replace
from decimal import Decimal

import httpx
import pytest

from erp_pipelines.config import connector_kwargs
from erp_pipelines.erps import tripletex as tripletex_module
from erp_pipelines.erps.extract import ACCOUNTS, BALANCES, extract_tenant
from erp_pipelines.erps.tripletex import TripletexConnector
from erp_pipelines.errors import AuthError, ClientAccessError, ConfigError, TenantMismatch
from erp_pipelines.model import ClientStatus, classify_clients, months_between
from erp_pipelines.pipeline import load_tenants
from erp_pipelines.registry import ERPS
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.tripletex import TripletexSandbox
from erp_pipelines.warehouse import Warehouse

MONTHS = months_between(dt.date(2026, 1, 1), dt.date(2026, 3, 1))


@pytest.fixture
def ledger():
    return generate_ledger(5, first_month=dt.date(2025, 10, 1), last_month=dt.date(2026, 3, 1))


def connect(sandbox, employee_token=None, **kwargs):
    return TripletexConnector(
        base_url="http://tripletex.sandbox/v2",
        consumer_token=sandbox.consumer_token,
        employee_token=employee_token or sandbox.accountant_employee_token,
        transport=httpx.ASGITransport(app=sandbox.app),
        **kwargs,
    )


def run(coro):
    return asyncio.run(coro)


def test_accountant_key_lists_clients_and_fetches_exact_balances(ledger):
    sandbox = TripletexSandbox(ledger)

    async def scenario():
        async with connect(sandbox) as connector:
            clients = classify_clients(await connector.list_clients())
            tenant = ledger.valid_tenants[0]
            client = next(c for c in clients if c.erp_client_id == str(tenant.erp_client_id))
            balances = [b for b in await connector.fetch_balances(client, MONTHS) if not b.is_zero]
            return clients, client, balances, await connector.fetch_accounts(client)

    clients, _, balances, accounts = run(scenario())
    assert [c.erp_client_id for c in clients] == [str(t.erp_client_id) for t in ledger.tenants]
    active = ledger.valid_tenants  # the lower client id of the two sharing a number holds it
    assert [c.status == ClientStatus.ACTIVE for c in clients] == [t in active for t in ledger.tenants]
    tenant = ledger.valid_tenants[0]
    assert sorted(balances, key=lambda b: (b.period, b.account_number)) == sorted(
        tenant.expected_balances(MONTHS), key=lambda b: (b.period, b.account_number))
    assert {a.account_number: a.name for a in accounts}["1920"] == "Bankinnskudd"
    assert len(accounts) == len(tenant.accounts)


def test_balance_requests_ask_for_exclusive_date_to_and_all_active_accounts(ledger):
    sandbox = TripletexSandbox(ledger)

    async def scenario():
        async with connect(sandbox) as connector:
            client = (await connector.list_clients())[0]
            await connector.fetch_balances(client, [dt.date(2026, 2, 1)])

    run(scenario())
    request = sandbox.stats.requests(template="GET /v2/balanceSheet")[0]
    assert "dateFrom=2026-02-01" in request.query and "dateTo=2026-03-01" in request.query
    assert "includeActiveAccountsWithoutMovements=true" in request.query


def test_company_own_key_is_its_single_tenant(ledger):
    own = ledger.valid_tenants[1]
    sandbox = TripletexSandbox(ledger, company_tokens={"company-own-key": own.erp_client_id})

    async def scenario():
        async with connect(sandbox, employee_token="company-own-key") as connector:
            clients = await connector.list_clients()
            return clients, [b for b in await connector.fetch_balances(clients[0], MONTHS[:1]) if not b.is_zero]

    clients, balances = run(scenario())
    assert [(c.erp_client_id, c.org_number, c.name) for c in clients] == [("0", own.org_number, own.name)]
    assert len(balances) == len(own.expected_balances(MONTHS[:1]))


def test_session_is_reminted_after_expiry_and_once_per_401(ledger):
    sandbox = TripletexSandbox(ledger)

    async def scenario():
        async with connect(sandbox) as connector:
            client = (await connector.list_clients())[0]
            sandbox.expire_all_sessions()
            balances = [b for b in await connector.fetch_balances(client, MONTHS) if not b.is_zero]
            return balances, connector

    balances, _ = run(scenario())
    assert len(balances) == len(ledger.tenants[0].expected_balances(MONTHS))
    creates = sandbox.stats.requests(template="POST /v2/token/session/:create")
    assert len(creates) == 2


def test_session_expiration_date_is_in_the_future_and_reminted_before_it(ledger):
    sandbox = TripletexSandbox(ledger, today=dt.date(2026, 11, 21))

    async def scenario(today):
        connector = connect(sandbox, today=today)
        async with connector:
            await connector.list_clients()
            first = sandbox.state.sessions[await connector.session.token()]
            connector._today = today + dt.timedelta(days=1)  # the day before expiry: re-mint
            sandbox.today = today + dt.timedelta(days=1)
            await connector.list_clients()
            return first, sandbox.state.sessions[await connector.session.token()]

    first, second = run(scenario(dt.date(2026, 11, 21)))
    assert first.expiration_date == dt.date(2026, 11, 23)
    assert second.expiration_date == dt.date(2026, 11, 24) and second.token != first.token


def test_revoked_klienttilgang_is_a_client_access_error_naming_the_tenant(ledger):
    sandbox = TripletexSandbox(ledger)
    tenant = ledger.valid_tenants[2]

    async def scenario():
        async with connect(sandbox) as connector:
            client = next(c for c in await connector.list_clients() if c.erp_client_id == str(tenant.erp_client_id))
            sandbox.revoke_client_access(tenant.erp_client_id)
            await connector.fetch_accounts(client)

    with pytest.raises(ClientAccessError) as caught:
        run(scenario())
    assert f"{tenant.name} (orgnr {tenant.org_number}" in str(caught.value)
    assert "Klienttilgang" in str(caught.value)


def test_wrong_token_is_an_auth_error_without_the_token(ledger):
    sandbox = TripletexSandbox(ledger)

    async def scenario():
        async with connect(sandbox, employee_token="not-a-real-key-4f1c") as connector:
            await connector.list_clients()

    with pytest.raises(AuthError) as caught:
        run(scenario())
    assert "TRIPLETEX_EMPLOYEE_TOKEN" in str(caught.value)
    assert "not-a-real-key-4f1c" not in str(caught.value)
    assert sandbox.consumer_token not in str(caught.value)


def test_client_list_is_paged_until_a_short_page(ledger, monkeypatch):
    monkeypatch.setattr(tripletex_module, "PAGE_SIZE", 3)
    sandbox = TripletexSandbox(ledger)

    async def scenario():
        async with connect(sandbox) as connector:
            return await connector.list_clients()

    assert len(run(scenario())) == len(ledger.tenants)  # 9 clients: pages of 3, 3, 3 and an empty one
    pages = sandbox.stats.requests(template="GET /v2/company/>withLoginAccess")
    assert len(pages) == 4


def test_own_company_guard_checks_the_organisation_number(ledger):
    own = ledger.valid_tenants[1]
    sandbox = TripletexSandbox(ledger, company_tokens={"company-own-key": own.erp_client_id})

    async def scenario():
        async with connect(sandbox, employee_token="company-own-key") as connector:
            client = (await connector.list_clients())[0]
            wrong = replace(client, org_number=ledger.valid_tenants[0].org_number)
            return await extract_tenant(connector, wrong, what=(ACCOUNTS, BALANCES), months=MONTHS)

    result = run(scenario())
    assert isinstance(result.error, TenantMismatch)
    assert "instead of this tenant" in str(result.error)
    assert result.accounts == [] and result.balances == []


# ---------------------------------------------------------------------------------------- reconciliation

SKEWED_DAY = dt.date(2026, 2, 10)


def load_reconciled(sandbox, warehouse, **settings):
    """Extract and land every valid tenant (MONTHS); the loaded extracts by erp_client_id."""

    async def scenario():
        async with connect(sandbox, **settings) as connector:
            active = [c for c in classify_clients(await connector.list_clients()) if c.is_active]
            batches = [b async for b in load_tenants(connector, warehouse, active, what=(ACCOUNTS, BALANCES),
                                                     months=MONTHS)]
        assert all(not b.failed for b in batches)
        return {e.client.erp_client_id: e for b in batches for e in b.loaded}

    return run(scenario())


def reconciliation_rows(warehouse, org_number):
    return warehouse.query(
        "SELECT check_name, account_number, period, expected, actual, message FROM reconciliation "
        "WHERE erp = 'tripletex' AND org_number = ? ORDER BY period, check_name", [org_number])


def test_reconcile_consistent_tenant_has_no_findings_and_no_reconciliation_rows(ledger, tmp_path):
    sandbox = TripletexSandbox(ledger)
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    extracts = load_reconciled(sandbox, warehouse, reconcile=True)

    assert set(extracts) == {str(t.erp_client_id) for t in ledger.valid_tenants}
    for tenant in ledger.valid_tenants:
        assert extracts[str(tenant.erp_client_id)].findings == []  # reconciled, nothing differs
        assert reconciliation_rows(warehouse, tenant.org_number) == []
    assert len(sandbox.stats.requests(template="GET /v2/ledger")) == len(MONTHS) * len(ledger.valid_tenants)


def test_reconcile_reports_where_the_ledger_disagrees(ledger, tmp_path):
    skewed, healthy = ledger.valid_tenants[1], ledger.valid_tenants[0]
    sandbox = TripletexSandbox(ledger)
    sandbox.skew_ledger(skewed.erp_client_id, 1920, 12_345, SKEWED_DAY)  # 123.45 only /ledger counts
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    extracts = load_reconciled(sandbox, warehouse, reconcile=True)

    truth = {b.period: b for b in skewed.expected_balances(MONTHS) if b.account_number == "1920"}
    february, march, skew = dt.date(2026, 2, 1), dt.date(2026, 3, 1), Decimal("123.45")
    expected = {  # (check, account, period, /ledger's amount, /balanceSheet's amount)
        ("ledger_movement", "1920", february, truth[february].movement + skew, truth[february].movement),
        ("ledger_closing_balance", "1920", february, truth[february].closing + skew, truth[february].closing),
        ("ledger_opening_balance", "1920", march, truth[march].opening + skew, truth[march].opening),
        ("ledger_closing_balance", "1920", march, truth[march].closing + skew, truth[march].closing),
    }
    findings = extracts[str(skewed.erp_client_id)].findings
    assert {(f["check_name"], f["account_number"], f["period"], f["expected"], f["actual"]) for f in findings} \
        == expected and len(findings) == 4
    rows = reconciliation_rows(warehouse, skewed.org_number)
    assert {row[:5] for row in rows} == expected
    movement = next(row for row in rows if row[0] == "ledger_movement")
    assert movement[5] == (f"2026-02 account 1920: /balanceSheet balanceChange {truth[february].movement} "
                           f"≠ /ledger sumAmount {truth[february].movement + skew} (difference -123.45)")
    # the stored balances are /balanceSheet's, to the øre
    stored = warehouse.query("SELECT period, closing FROM balances WHERE erp = 'tripletex' AND org_number = ? "
                             "AND account_number = '1920' ORDER BY period", [skewed.org_number])
    assert stored == [(month, truth[month].closing) for month in MONTHS]
    assert extracts[str(healthy.erp_client_id)].findings == []
    assert reconciliation_rows(warehouse, healthy.org_number) == []


def test_reconcile_off_by_default_makes_no_ledger_request(ledger, tmp_path):
    sandbox = TripletexSandbox(ledger)
    sandbox.skew_ledger(ledger.valid_tenants[0].erp_client_id, 1920, 12_345, SKEWED_DAY)
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    extracts = load_reconciled(sandbox, warehouse)  # TRIPLETEX_RECONCILE unset

    assert all(e.findings is None for e in extracts.values())
    assert sandbox.stats.requests(template="GET /v2/ledger") == []
    assert len(sandbox.stats.requests(template="GET /v2/balanceSheet")) == len(MONTHS) * len(ledger.valid_tenants)
    assert warehouse.query("SELECT count(*) FROM reconciliation") == [(0,)]


def test_reconcile_setting_is_read_from_the_environment():
    spec = ERPS["tripletex"]
    assert connector_kwargs(spec, {})["reconcile"] == "false"
    base = {"consumer_token": "c", "employee_token": "e"}
    assert TripletexConnector(**base, **connector_kwargs(spec, {"TRIPLETEX_RECONCILE": "true"})).reconcile is True
    assert TripletexConnector(**base, **connector_kwargs(spec, {})).reconcile is False
    with pytest.raises(ConfigError) as caught:
        TripletexConnector(**base, **connector_kwargs(spec, {"TRIPLETEX_RECONCILE": "sometimes"}))
    assert "TRIPLETEX_RECONCILE" in str(caught.value) and "true or" in str(caught.value)
