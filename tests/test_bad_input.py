"""Bad input: each case gets a clear error (naming the variable, the tenant, the fix) and nothing is
stored for it."""

import asyncio
import datetime as dt
import json
import socket

import httpx
import pytest

from erp_pipelines.config import connector_from_environment
from erp_pipelines.defs.build import build_definitions
from erp_pipelines.erps.extract import ACCOUNTS, BALANCES
from erp_pipelines.erps.kit import RetryPolicy
from erp_pipelines.erps.tripletex import TripletexConnector
from erp_pipelines.errors import BadResponse, ConfigError, UpstreamError
from erp_pipelines.model import (
    Balance,
    Client,
    ClientStatus,
    classify_clients,
    months_between,
    normalise_tenant_id,
)
from erp_pipelines.pipeline import load_tenants, refresh_clients
from erp_pipelines.sandbox.ledger import generate_ledger, make_org_number
from erp_pipelines.sandbox.tripletex import TripletexSandbox
from erp_pipelines.warehouse import Warehouse

MONTHS = months_between(dt.date(2026, 1, 1), dt.date(2026, 2, 1))
SECRET = "consumer-secret-value-91c2"


def good_env(tmp_path):
    return {
        "ERP_WAREHOUSE_PATH": str(tmp_path / "warehouse.duckdb"),
        "ERP_SOURCES": "tripletex",
        "TRIPLETEX_BASE_URL": "https://api-test.tripletex.tech/v2",
        "TRIPLETEX_CONSUMER_TOKEN": SECRET,
        "TRIPLETEX_EMPLOYEE_TOKEN": "employee-secret-value-77aa",
    }


# ---------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("change", "variable", "says"),
    [
        ({"TRIPLETEX_EMPLOYEE_TOKEN": None}, "TRIPLETEX_EMPLOYEE_TOKEN", "is not set"),
        ({"TRIPLETEX_CONSUMER_TOKEN": "   "}, "TRIPLETEX_CONSUMER_TOKEN", "is not set"),
        ({"ERP_SOURCES": None, "TRIPLETEX_EMPLOYEE_TOKEN": None}, "TRIPLETEX_EMPLOYEE_TOKEN", "is not set"),
        ({"TRIPLETEX_BASE_URL": "tripletex.no/v2"}, "TRIPLETEX_BASE_URL", "is not an http(s) URL"),
        ({"TRIPLETEX_BASE_URL": "ftp://tripletex.no/v2"}, "TRIPLETEX_BASE_URL", "is not an http(s) URL"),
        ({"TRIPLETEX_BASE_URL": "https://"}, "TRIPLETEX_BASE_URL", "is not an http(s) URL"),
        ({"TRIPLETEX_BASE_URL": "https://api-test.tripletex .tech/v2"}, "TRIPLETEX_BASE_URL", "contains whitespace"),
        ({"TRIPLETEX_BASE_URL": "https:///v2"}, "TRIPLETEX_BASE_URL", "names no host"),
        ({"TRIPLETEX_BASE_URL": "https://api-test.tripletex.tech"}, "TRIPLETEX_BASE_URL", "must end in /v2"),
        ({"ERP_SOURCES": "tripletex,fikenn"}, "ERP_SOURCES", "unknown ERP(s): fikenn"),
        ({"ERP_TENANTS_PER_RUN": "many"}, "ERP_TENANTS_PER_RUN", "positive whole number"),
        ({"TRIPLETEX_HISTORY_START": "last year"}, "TRIPLETEX_HISTORY_START", "is not a date"),
        ({"ERP_TOKEN_STORE_KEY": "not-a-key"}, "ERP_TOKEN_STORE_KEY", "not a valid token store key"),
    ],
)
def test_invalid_configuration_fails_at_load_time_naming_the_variable(tmp_path, change, variable, says):
    env = {**good_env(tmp_path), **change}
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(ConfigError) as caught:
        build_definitions(env)
    message = str(caught.value)
    assert variable in message and says in message and "Fix:" in message
    assert SECRET not in message and "employee-secret-value-77aa" not in message
    assert not (tmp_path / "warehouse.duckdb").exists()  # nothing stored, nothing even created


def test_a_tripletex_url_without_v2_fails_at_load_time_with_the_fix(tmp_path):
    env = {**good_env(tmp_path), "TRIPLETEX_BASE_URL": "https://api-test.tripletex.tech/"}
    with pytest.raises(ConfigError) as caught:
        build_definitions(env)
    assert str(caught.value) == ("TRIPLETEX_BASE_URL must end in /v2 (the API's path), but it has no path "
                                 "Fix: append /v2: set TRIPLETEX_BASE_URL to the full URL, e.g. https://tripletex.no/v2")


def test_a_refused_connection_names_the_host_and_the_variable_that_sets_it(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**good_env(tmp_path), "TRIPLETEX_BASE_URL": f"http://127.0.0.1:{port}/v2"}
    connector = connector_from_environment("tripletex", env, retry=RetryPolicy(max_attempts=2, backoff_base=0))
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    with pytest.raises(UpstreamError) as caught:
        asyncio.run(_run(connector, warehouse))  # the <erp>/clients step: listing the clients
    message = str(caught.value)
    assert f"cannot connect to 127.0.0.1:{port} (set by TRIPLETEX_BASE_URL)" in message
    assert f"Fix: check TRIPLETEX_BASE_URL (host name and port) and that this machine reaches 127.0.0.1:{port}" \
        in message
    assert "retry the partition" not in message  # listing clients is no partition's work
    assert SECRET not in message and "employee-secret-value-77aa" not in message


def test_no_erp_configured_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no ERP is configured.*<ERP>_.*SAFT_DROP_DIR"):
        build_definitions({"ERP_WAREHOUSE_PATH": str(tmp_path / "w.duckdb")})


def test_valid_configuration_binds_settings_from_the_mapping_given(tmp_path):
    env = {**good_env(tmp_path), "TRIPLETEX_BASE_URL": "https://api-test.tripletex.tech/v2 "}
    defs = build_definitions(env)  # os.environ has no TRIPLETEX_* (tests/conftest.py)
    resource = defs.resources["tripletex"]
    assert resource.base_url == "https://api-test.tripletex.tech/v2"  # the validated value, trimmed
    assert resource.token_store_path == str(tmp_path / "tokens.enc")


# ---------------------------------------------------------------------------------------- organisation numbers


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "has no organisation number"),
        ("98765432", "must have 9 digits"),
        ("9876543210", "must have 9 digits"),
        ("ABC123456", "is not numeric"),
        (make_org_number(5)[:-1] + str((int(make_org_number(5)[-1]) + 1) % 10), "fails the mod-11 check digit"),
        ("01010112345", "personal number (11 digits) fails validation"),
    ],
)
def test_invalid_organisation_numbers_are_refused_with_the_reason(raw, reason):
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        normalise_tenant_id(raw)
    (client,) = classify_clients([Client("x", raw, "1", "Feil AS")])
    assert client.status == ClientStatus.REJECTED and reason in client.status_reason
    assert "cannot be activated" in client.status_reason


def test_formatted_numbers_are_normalised():
    number = make_org_number(11)
    assert normalise_tenant_id(f" {number[:3]} {number[3:6]} {number[6:]} ") == number


def _sandbox_world(tmp_path, ledger):
    sandbox = TripletexSandbox(ledger)
    connector = TripletexConnector(
        base_url="http://tripletex.sandbox/v2", consumer_token=sandbox.consumer_token,
        employee_token=sandbox.accountant_employee_token, transport=httpx.ASGITransport(app=sandbox.app),
    )
    return sandbox, connector, Warehouse(tmp_path / "warehouse.duckdb")


async def _run(connector, warehouse):
    async with connector:
        listed, change = await refresh_clients(connector, warehouse)
        active = list(warehouse.active_clients("tripletex", change.active).values())
        failed = {}
        async for batch in load_tenants(connector, warehouse, active, what=(ACCOUNTS, BALANCES), months=MONTHS):
            failed.update({e.client.org_number: e.error for e in batch.failed})
        return listed, change, failed


def test_invalid_and_duplicate_organisation_numbers_are_rejected_and_nothing_is_stored(tmp_path):
    """generate_ledger's fixtures: no number, a bad check digit, and two clients sharing one number
    (the lower client id holds it; the other is rejected)."""
    ledger = generate_ledger(3, first_month=MONTHS[0], last_month=MONTHS[-1])
    sandbox, connector, warehouse = _sandbox_world(tmp_path, ledger)
    _, change, failed = asyncio.run(_run(connector, warehouse))
    rejected = {c.name: c.status_reason for c in change.rejected}
    assert set(rejected) == {"Uten Orgnr Testklient", "Feil Kontrollsiffer AS", "Dobbel Registrert Kopi AS"}
    assert "is held by tripletex client" in rejected["Dobbel Registrert Kopi AS"] and failed == {}
    active = ledger.valid_tenants
    bad = [t for t in ledger.tenants if t not in active]
    bad_ids = [str(t.erp_client_id) for t in bad]
    assert warehouse.query("SELECT count(*) FROM clients WHERE erp_client_id IN (SELECT unnest(?::VARCHAR[])) "
                           "AND status = 'rejected'", [bad_ids]) == [(3,)]
    stored = {org for (org,) in warehouse.query("SELECT DISTINCT org_number FROM balances UNION "
                                                "SELECT DISTINCT org_number FROM accounts")}
    assert stored == {t.org_number for t in active}  # only the valid ones and the number's holder
    requested = {r.tenant for r in sandbox.stats.log}
    assert not requested & set(bad_ids)  # a rejected tenant is never even asked for data


def test_a_client_listed_twice_is_one_tenant_not_a_duplicate():
    number = make_org_number(3)
    once = Client("tripletex", number, "80001", "Fjord AS")
    assert [c.status for c in classify_clients([once, once])] == [ClientStatus.ACTIVE]
    other = Client("tripletex", number, "80002", "Fjord Kopi AS")
    assert [c.status for c in classify_clients([once, other])] == [ClientStatus.ACTIVE, ClientStatus.REJECTED]


def test_a_duplicated_row_never_reaches_the_warehouse(tmp_path):
    warehouse = Warehouse(tmp_path / "w.duckdb")
    row = Balance(MONTHS[0], "1920", 1, 2, 3)
    warehouse.replace_balances("tripletex", {"A": [row]}, MONTHS, run_id="before")
    with pytest.raises(ValueError, match="appears twice in one write; nothing was written"):
        warehouse.replace_balances("tripletex", {"A": [row, row]}, MONTHS)
    assert warehouse.query("SELECT run_id FROM balances") == [("before",)]


# ---------------------------------------------------------------------------------------- schema drift


class ExtraFields(httpx.AsyncBaseTransport):
    """Adds fields the connector has never heard of to every JSON object the ERP returns."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request):
        response = await self.inner.handle_async_request(request)
        body = await response.aread()
        try:
            document = json.loads(body)
        except ValueError:
            return httpx.Response(response.status_code, headers=response.headers, content=body)

        def grow(value):
            if isinstance(value, dict):
                return {**{k: grow(v) for k, v in value.items()}, "newField2027": {"nested": [1, "x"]},
                        "isArchived": False}
            if isinstance(value, list):
                return [grow(v) for v in value]
            return value

        headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
        return httpx.Response(response.status_code, headers=headers, json=grow(document))


def test_unknown_fields_are_tolerated(tmp_path):
    ledger = generate_ledger(3, first_month=MONTHS[0], last_month=MONTHS[-1])
    sandbox, connector, warehouse = _sandbox_world(tmp_path, ledger)
    connector.api._http._transport = ExtraFields(httpx.ASGITransport(app=sandbox.app))
    _, _, failed = asyncio.run(_run(connector, warehouse))
    assert failed == {}
    for tenant in ledger.valid_tenants:
        got = warehouse.query("SELECT period, account_number, opening, movement, closing FROM balances "
                              "WHERE org_number = ? ORDER BY ALL", [tenant.org_number])
        assert got == sorted((b.period, b.account_number, b.opening, b.movement, b.closing)
                             for b in tenant.expected_balances(MONTHS))


@pytest.mark.parametrize(
    ("path", "field", "missing"),
    [
        ("/balanceSheet", "values.*.balanceIn", "balanceIn"),
        ("/ledger/account", "values.*.number", "number"),
        ("/token/session/>whoAmI", "value.company", "company"),
        ("/balanceSheet", "values", "'values' list"),
    ],
)
def test_a_missing_required_field_is_refused_naming_the_tenant_and_nothing_is_stored(tmp_path, path, field, missing):
    ledger = generate_ledger(3, first_month=MONTHS[0], last_month=MONTHS[-1])
    sandbox, connector, warehouse = _sandbox_world(tmp_path, ledger)
    victim = ledger.valid_tenants[1]
    sandbox.faults.drop_field(field, None, path_prefix=path, tenant=victim.erp_client_id)
    _, _, failed = asyncio.run(_run(connector, warehouse))
    assert set(failed) == {victim.org_number}  # only that tenant
    error = failed[victim.org_number]
    assert isinstance(error, BadResponse)
    message = str(error)
    assert f"{victim.name} (orgnr {victim.org_number}" in message and missing in message
    for table in ("balances", "accounts"):
        assert warehouse.query(f"SELECT count(*) FROM {table} WHERE org_number = ?", [victim.org_number]) == [(0,)]
    others = {org for (org,) in warehouse.query("SELECT DISTINCT org_number FROM balances")}
    assert others == {t.org_number for t in ledger.valid_tenants} - {victim.org_number}
    status = warehouse.query("SELECT status, last_error FROM clients WHERE org_number = ?", [victim.org_number])
    assert status[0][0] == "active" and missing in status[0][1]  # still a tenant, with the error to fix
