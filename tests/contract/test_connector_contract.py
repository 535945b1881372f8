"""The connector contract: the same tests for every API ERP in the registry, each against its
simulator served on 127.0.0.1 (real HTTP). A new ERP gets all of them through its registry line.

In the spirit of the Meltano SDK's standard tap tests: exact balances, paging, tokens expiring
mid-run, credential and tenant failures, rate-limit storms in every window mode, tenant
mismatches, broken payloads, idempotent re-runs and secrets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest
from contract_support import Served, balances_of, expected_of, serve_erp

from erp_pipelines.erps.extract import ACCOUNTS, BALANCES, extract_tenant, extract_tenants
from erp_pipelines.errors import AuthError, BadResponse, ClientAccessError, TenantMismatch, _secrets
from erp_pipelines.model import classify_clients
from erp_pipelines.pipeline import load_tenants, refresh_clients
from erp_pipelines.registry import api_erps
from erp_pipelines.sandbox.common import WINDOW_MODES

ERPS = [spec.name for spec in api_erps()]
pytestmark = pytest.mark.parametrize("erp", ERPS)


def run(coro):
    return asyncio.run(coro)


async def _clients(served: Served, connector) -> list:
    return [c for c in classify_clients(await connector.list_clients()) if c.is_active]


def test_balances_equal_the_truth_ledger_to_the_ore_for_every_tenant_and_month(erp, tmp_path):
    with serve_erp(erp, tmp_path) as served:
        async def scenario():
            async with served.connector() as connector:
                clients = await _clients(served, connector)
                return [extract async for extract in extract_tenants(connector, clients, months=served.months)]

        extracts = run(scenario())
        assert {e.client.org_number for e in extracts} == {t.org_number for t in served.ledger.valid_tenants}
        for extract in extracts:
            assert extract.error is None, extract.error
            assert balances_of(extract) == expected_of(served, extract.client), extract.client.label
            assert {a.account_number for a in extract.accounts} >= {b.account_number for b in extract.balances}


def test_paging_reads_every_page(erp, tmp_path):
    with serve_erp(erp, tmp_path, page_size=4) as served:
        tenant = served.ledger.valid_tenants[0]

        async def scenario():
            async with served.connector() as connector:
                client = next(c for c in await _clients(served, connector) if c.org_number == tenant.org_number)
                return await extract_tenant(connector, client, what=(ACCOUNTS, BALANCES), months=served.months)

        extract = run(scenario())
        assert extract.error is None, extract.error
        assert balances_of(extract) == expected_of(served, extract.client)
        pages = served.stats.requests(template=None, tenant=served.simulator.scope_of(tenant))
        accounts_pages = [r for r in pages if served.simulator.paths.accounts in r.path]
        assert len(accounts_pages) >= len(tenant.accounts) // 4  # the chart took many pages


def test_an_access_token_expiring_mid_run_is_reminted(erp, tmp_path):
    with serve_erp(erp, tmp_path) as served:
        async def scenario():
            async with served.connector() as connector:
                clients = await _clients(served, connector)
                first = await extract_tenant(connector, clients[0], what=(ACCOUNTS, BALANCES), months=served.months)
                served.simulator.expire_tokens()
                second = await extract_tenant(connector, clients[1], what=(ACCOUNTS, BALANCES), months=served.months)
                return first, second

        for extract in run(scenario()):
            assert extract.error is None, extract.error
            assert balances_of(extract) == expected_of(served, extract.client)


def test_a_refused_own_credential_is_an_auth_error_naming_the_variable(erp, tmp_path):
    with serve_erp(erp, tmp_path) as served:
        environment, variable = served.simulator.wrong_credential(served.environment)

        async def scenario():
            async with served.connector(environment) as connector:
                await connector.list_clients()

        with pytest.raises(AuthError) as caught:
            run(scenario())
        assert variable in str(caught.value)


def test_one_tenant_without_access_fails_alone_with_its_fix(erp, tmp_path):
    with serve_erp(erp, tmp_path) as served:
        denied = served.ledger.valid_tenants[1]

        async def scenario():
            async with served.connector() as connector:
                clients = await _clients(served, connector)
                served.simulator.deny_access(denied)
                return [e async for e in extract_tenants(connector, clients, months=served.months)]

        extracts = run(scenario())
        failed = [e for e in extracts if e.error is not None]
        assert [e.client.org_number for e in failed] == [denied.org_number]
        message = str(failed[0].error)
        assert isinstance(failed[0].error, ClientAccessError)
        assert denied.name in message and denied.org_number in message and "Fix:" in message
        assert served.simulator.deny_access_fix in message
        for extract in extracts:
            if extract.error is None:
                assert balances_of(extract) == expected_of(served, extract.client)


@pytest.mark.parametrize("mode", WINDOW_MODES)
def test_the_erps_own_limit_in_every_window_mode_gives_no_429_storm(erp, mode, tmp_path):
    with serve_erp(erp, tmp_path, tenants=3, months=1) as served:
        policy = served.simulator.contract_rate_limit
        served.simulator.set_rate_limit(dataclasses.replace(policy, mode=mode))

        async def scenario():
            async with served.connector() as connector:
                clients = await _clients(served, connector)
                return [e async for e in extract_tenants(connector, clients, months=served.months)]

        extracts = run(scenario())
        assert all(e.error is None for e in extracts), [str(e.error) for e in extracts if e.error]
        for extract in extracts:
            assert balances_of(extract) == expected_of(served, extract.client)
        total, limited = served.stats.total, served.stats.too_many_requests
        assert limited <= max(1, total // 100), f"{limited} of {total} requests answered 429 ({mode})"


def test_a_burst_of_429s_is_waited_out(erp, tmp_path):
    with serve_erp(erp, tmp_path) as served:
        served.simulator.faults.too_many_requests(3, retry_after=0.2, path_prefix=served.simulator.paths.balances)
        served.simulator.faults.too_many_requests(2, path_prefix=served.simulator.paths.accounts)

        async def scenario():
            async with served.connector() as connector:
                clients = await _clients(served, connector)
                return await extract_tenant(connector, clients[0], what=(ACCOUNTS, BALANCES), months=served.months)

        extract = run(scenario())
        assert extract.error is None, extract.error
        assert balances_of(extract) == expected_of(served, extract.client)
        assert served.stats.too_many_requests == 5


def test_a_tenant_mismatch_is_refused_and_nothing_is_stored(erp, tmp_path):
    with serve_erp(erp, tmp_path) as served:
        tenant, other = served.ledger.valid_tenants[0], served.ledger.valid_tenants[1]

        async def scenario():
            async with served.connector() as connector:
                clients, _ = await refresh_clients(connector, served.warehouse)
                active = [c for c in clients if c.is_active]
                served.simulator.swap_identity(tenant, other)
                return [batch async for batch in load_tenants(connector, served.warehouse, active,
                                                              what=(ACCOUNTS, BALANCES), months=served.months)]

        batches = run(scenario())
        failed = [e for batch in batches for e in batch.failed]
        assert [e.client.org_number for e in failed] == [tenant.org_number]
        assert isinstance(failed[0].error, TenantMismatch)
        stored = served.warehouse.query("SELECT count(*) FROM balances WHERE org_number = ?", [tenant.org_number])
        assert stored == [(0,)]


def test_a_malformed_payload_is_retried_and_a_drifted_schema_refused(erp, tmp_path):
    with serve_erp(erp, tmp_path) as served:
        sim = served.simulator
        clean, drifted = served.ledger.valid_tenants[0], served.ledger.valid_tenants[1]
        sim.faults.malformed_json(1, tenant=sim.scope_of(clean), path_prefix=sim.paths.balances)
        sim.faults.drop_field(sim.required_balance_field, None, tenant=sim.scope_of(drifted),
                              path_prefix=sim.paths.balances)

        async def scenario():
            async with served.connector() as connector:
                clients = {c.org_number: c for c in await _clients(served, connector)}
                return [await extract_tenant(connector, clients[t.org_number], what=(ACCOUNTS, BALANCES),
                                             months=served.months) for t in (clean, drifted)]

        survived, refused = run(scenario())
        assert survived.error is None and balances_of(survived) == expected_of(served, survived.client)
        assert isinstance(refused.error, BadResponse) and "update the connector" in str(refused.error)
        assert refused.balances == []


def test_a_rerun_is_idempotent(erp, tmp_path):
    with serve_erp(erp, tmp_path) as served:
        async def load():
            async with served.connector() as connector:
                clients, _ = await refresh_clients(connector, served.warehouse)
                async for _ in load_tenants(connector, served.warehouse, [c for c in clients if c.is_active],
                                            what=(ACCOUNTS, BALANCES), months=served.months):
                    pass

        query = ("SELECT org_number, period, account_number, opening, movement, closing FROM balances "
                 "WHERE erp = ? ORDER BY ALL")
        run(load())
        first = served.warehouse.query(query, [erp])
        run(load())
        assert served.warehouse.query(query, [erp]) == first
        expected = sum(len(served.ledger.by_org_number(t.org_number)[0].expected_balances(served.months))
                       for t in served.ledger.valid_tenants)
        assert len(first) == expected


def test_no_secret_reaches_logs_errors_or_the_warehouse(erp, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with serve_erp(erp, tmp_path) as served:
        denied = served.ledger.valid_tenants[0]
        served.simulator.deny_access(denied)

        async def load():
            async with served.connector() as connector:
                clients, _ = await refresh_clients(connector, served.warehouse)
                served.simulator.expire_tokens()
                return [b async for b in load_tenants(connector, served.warehouse, [c for c in clients if c.is_active],
                                                      what=(ACCOUNTS, BALANCES), months=served.months)]

        batches = run(load())
        errors = [str(e.error) for b in batches for e in b.failed]
        assert errors, "the denied tenant's error is part of what is scanned"
        dump = "\n".join(str(row) for table in ("clients", "accounts", "balances")
                         for row in served.warehouse.query(f"SELECT * FROM {table}"))
        secrets = {v for k, v in served.environment.items() if k in served.secret_variables} | set(_secrets)
        assert secrets
        for secret in secrets:
            for where, text in (("log", caplog.text), ("errors", "\n".join(errors)), ("warehouse", dump)):
                assert secret not in text, f"a secret reached the {where}"
