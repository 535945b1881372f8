"""PowerOffice Go: one client key per tenant, refused keys, and the keys never shown."""

import asyncio
import datetime as dt

import pytest

from erp_pipelines.config import connector_from_environment
from erp_pipelines.erps.poweroffice import client_id
from erp_pipelines.errors import AuthError, ClientAccessError
from erp_pipelines.model import months_between
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.poweroffice import PowerOfficeSandbox

MONTHS = months_between(dt.date(2025, 12, 1), dt.date(2026, 1, 1))


@pytest.fixture
def poweroffice():
    ledger = generate_ledger(3, first_month=dt.date(2025, 6, 1), last_month=MONTHS[-1])
    sandbox = PowerOfficeSandbox(ledger)
    with sandbox.serve() as url:
        yield sandbox, ledger, sandbox.environment(url)


def run(env, scenario):
    async def go():
        async with connector_from_environment("poweroffice", env) as connector:
            return await scenario(connector)

    return asyncio.run(go())


def test_a_client_that_removed_the_integration_is_left_out_of_the_list_and_fails_alone(poweroffice):
    sandbox, ledger, env = poweroffice
    gone, kept = ledger.valid_tenants[0], ledger.valid_tenants[1]

    async def scenario(connector):
        clients = {c.org_number: c for c in await connector.list_clients()}
        sandbox.deactivate_client(gone.erp_client_id)
        with pytest.raises(ClientAccessError) as caught:
            await connector.fetch_balances(clients[gone.org_number], MONTHS)
        listed = {c.org_number for c in await connector.list_clients()}
        return caught.value, listed, await connector.fetch_balances(clients[kept.org_number], MONTHS)

    error, listed, balances = run(env, scenario)
    assert gone.name in str(error) and "Innstillinger → Utvidelser" in str(error)
    assert sandbox.client_key_of(gone.erp_client_id) not in str(error)
    assert gone.org_number not in listed and kept.org_number in listed
    key = lambda b: (b.period, b.account_number)
    assert sorted((b for b in balances if not b.is_zero), key=key) == sorted(kept.expected_balances(MONTHS), key=key)


def test_tenants_are_named_by_a_hash_of_their_client_key(poweroffice):
    sandbox, _, env = poweroffice
    clients = run(env, lambda connector: connector.list_clients())
    keys = set(sandbox.client_keys)
    assert {c.erp_client_id for c in clients} <= {client_id(key) for key in keys}
    assert not {c.erp_client_id for c in clients} & keys


@pytest.mark.parametrize("variable", ["POWEROFFICE_APPLICATION_KEY", "POWEROFFICE_SUBSCRIPTION_KEY"])
def test_a_refused_integration_key_is_an_auth_error_naming_it(poweroffice, variable):
    _, _, env = poweroffice
    with pytest.raises(AuthError) as caught:
        run({**env, variable: "0" * 32}, lambda connector: connector.list_clients())
    assert variable in str(caught.value) and "0" * 32 not in str(caught.value)


def test_a_client_the_erp_cannot_describe_for_a_moment_keeps_its_registry_entry(poweroffice, tmp_path):
    from erp_pipelines.pipeline import refresh_clients
    from erp_pipelines.warehouse import Warehouse

    sandbox, ledger, env = poweroffice
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    flaky = ledger.valid_tenants[0]
    run(env, lambda connector: refresh_clients(connector, warehouse))
    sandbox.faults.server_error(503, times=None, tenant=sandbox.scope_of(flaky))
    _, change = run(env, lambda connector: refresh_clients(connector, warehouse))
    assert flaky.org_number not in change.active and change.revoked == []
    status = warehouse.query("SELECT status FROM clients WHERE org_number = ?", [flaky.org_number])
    assert status == [("active",)]
