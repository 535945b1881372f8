"""Visma eAccounting: one consent per company (the command, the client rules), rotating refresh tokens
across processes (one refresh for two processes, crashes around the refresh) and a revoked consent."""

import asyncio
import datetime as dt
import os
import subprocess
import sys

import httpx
import pytest
from consent_support import ROOT, free_port, run_consent

from erp_pipelines.config import connector_from_environment
from erp_pipelines.erps.eaccounting import ACR_VALUES, SCOPES
from erp_pipelines.erps.extract import ACCOUNTS, BALANCES, extract_tenant
from erp_pipelines.errors import ClientAccessError
from erp_pipelines.model import months_between
from erp_pipelines.sandbox.eaccounting import EAccountingSandbox
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.tokens import KEY_VARIABLE, PATH_VARIABLE, TokenStore

MONTHS = months_between(dt.date(2025, 12, 1), dt.date(2026, 2, 1))

# A run in its own process: lists the consented companies and checks each (a request with its token).
# argv[1] kills the process (SIGKILL) at a point around a refresh, or slows the refresh down.
RUN = """
import asyncio, os, signal, sys, time
from erp_pipelines.config import connector_from_environment
from erp_pipelines.erps.kit.auth import RefreshingToken
from erp_pipelines.errors import ErpError
from erp_pipelines.tokens import TokenStore

point, refresh, put = sys.argv[1], RefreshingToken.refresh, TokenStore.put
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

async def patched_refresh(self, stored):
    if point == "before-refresh":
        die()
    if point == "slow-refresh":
        await asyncio.sleep(1.0)
    return await refresh(self, stored)

def patched_put(self, name, value):
    if point == "after-refresh-before-store":
        die()
    put(self, name, value)
    if point == "after-store":
        die()

RefreshingToken.refresh, TokenStore.put = patched_refresh, patched_put

async def main():
    async with connector_from_environment("eaccounting") as connector:
        for client in await connector.list_clients():
            await connector.verify_tenant(client)
            print("ok", client.org_number)

try:
    asyncio.run(main())
except ErpError as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
"""


@pytest.fixture
def ea(tmp_path):
    ledger = generate_ledger(3, first_month=dt.date(2025, 6, 1), last_month=MONTHS[-1])
    sandbox = EAccountingSandbox(ledger)
    with sandbox.serve() as url:
        env = {**sandbox.environment(url), PATH_VARIABLE: str(tmp_path / "tokens.enc"),
               KEY_VARIABLE: TokenStore.generate_key(),
               "EACCOUNTING_REDIRECT_URI": f"http://127.0.0.1:{free_port()}/callback"}
        yield sandbox, ledger, env


def consent(sandbox, tenant, env) -> subprocess.CompletedProcess:
    """`erp-pipelines consent eaccounting --no-browser`, the user picking `tenant` at the login."""
    sandbox.select_company(tenant)
    return run_consent("eaccounting", env)


def run_in_process(env, point: str = "none") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN, point], cwd=ROOT, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_consent_is_one_company_per_login_under_the_client_rules(ea):
    sandbox, ledger, env = ea
    first, second = ledger.valid_tenants[:2]
    no_number, _, shared, shared_copy = ledger.tenants[3:7]

    given = consent(sandbox, first, env)
    assert given.returncode == 0, given.stdout + given.stderr
    url = next(line for line in given.stdout.splitlines() if line.startswith("http"))
    query = httpx.URL(url).params
    assert query["scope"] == SCOPES and query["acr_values"] == ACR_VALUES and query["prompt"] == "login"
    assert url.startswith(env["EACCOUNTING_IDENTITY_URL"] + "/connect/authorize?")
    assert f"{first.name} (orgnr {first.org_number}): consented" in given.stdout
    assert consent(sandbox, second, env).returncode == 0

    refused = consent(sandbox, no_number, env)
    assert refused.returncode == 1 and "refused" in refused.stdout and "standardfirma" in refused.stdout
    assert consent(sandbox, shared, env).returncode == 0
    twice = consent(sandbox, shared_copy, env)  # the number is already consented for another company
    assert twice.returncode == 1 and "already consented" in twice.stdout

    again = consent(sandbox, first, env)  # consenting a company again replaces its consent
    assert again.returncode == 0

    async def listed():
        async with connector_from_environment("eaccounting", env) as connector:
            return await connector.list_clients()

    clients = asyncio.run(listed())
    assert sorted((c.name, c.org_number) for c in clients) == \
        sorted((t.name, t.org_number) for t in (first, second, shared))


def test_the_consent_help_names_the_default_company_setting():
    shown = subprocess.run([sys.executable, "-m", "erp_pipelines", "consent", "--help"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    assert "standardfirma" in shown
    env = {"EACCOUNTING_CLIENT_ID": "id", "EACCOUNTING_CLIENT_SECRET": "secret"}
    connector = connector_from_environment("eaccounting", {**env, PATH_VARIABLE: "/tmp/unused-tokens.enc"})
    assert "standardfirma" in connector.oauth_app().help


def test_a_refresh_stores_the_rotated_token_before_it_is_used(ea):
    sandbox, ledger, env = ea
    assert consent(sandbox, ledger.valid_tenants[0], env).returncode == 0
    sandbox.expire_tokens()

    async def scenario():
        async with connector_from_environment("eaccounting", env) as connector:
            (client,) = await connector.list_clients()
            return connector, await extract_tenant(connector, client, what=(ACCOUNTS, BALANCES), months=MONTHS)

    connector, extract = asyncio.run(scenario())
    assert extract.error is None and sandbox.refreshes == 1
    (company_id,) = connector.consents()
    stored = connector.token_store.get(connector.consent_entry(company_id))
    assert stored["refresh_token"] in sandbox.refresh_tokens  # the newest one, and the only live one
    assert len(sandbox.refresh_tokens) == 1


def test_two_processes_refreshing_one_company_refresh_once_and_both_succeed(ea):
    sandbox, ledger, env = ea
    tenant = ledger.valid_tenants[0]
    assert consent(sandbox, tenant, env).returncode == 0
    sandbox.expire_tokens()
    runs = [run_in_process(env, "slow-refresh") for _ in range(2)]
    outputs = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert all(f"ok {tenant.org_number}" in out for out, _ in outputs)
    assert sandbox.refreshes == 1  # the second process re-read the store under the lock
    sandbox.expire_tokens()
    third = run_in_process(env)
    assert third.communicate(timeout=60) and third.returncode == 0 and sandbox.refreshes == 2  # consent intact


@pytest.mark.parametrize("point, survives", [
    ("before-refresh", True),  # nothing was spent: the stored refresh token still works
    ("after-store", True),  # the rotated token is durable: the next process uses it (no new refresh)
    # the one window no client can close: the identity server rotated, the answer died with the process
    ("after-refresh-before-store", False),
])
def test_a_crash_around_the_refresh(ea, point, survives):
    sandbox, ledger, env = ea
    tenant = ledger.valid_tenants[0]
    assert consent(sandbox, tenant, env).returncode == 0
    sandbox.expire_tokens()
    crashed = run_in_process(env, point)
    crashed.communicate(timeout=60)
    assert crashed.returncode == -9
    refreshes = sandbox.refreshes
    assert refreshes == (0 if point == "before-refresh" else 1)

    after = run_in_process(env)
    out, err = after.communicate(timeout=60)
    if survives:
        assert after.returncode == 0 and f"ok {tenant.org_number}" in out, out + err
        assert sandbox.refreshes == (1 if point == "before-refresh" else refreshes)  # after-store: no refresh
    else:  # the company fails alone, saying how to give the consent again
        assert after.returncode == 3 and "ClientAccessError" in out and tenant.name in out
        assert "erp-pipelines consent eaccounting" in out


def test_a_revoked_consent_fails_that_company_alone(ea):
    sandbox, ledger, env = ea
    kept, revoked = ledger.valid_tenants[:2]
    assert consent(sandbox, kept, env).returncode == 0 and consent(sandbox, revoked, env).returncode == 0

    async def scenario():
        async with connector_from_environment("eaccounting", env) as connector:
            sandbox.revoke(revoked)
            sandbox.expire_tokens()
            clients = await connector.list_clients()  # still listed, from the stored consent
            return {c.org_number: await extract_tenant(connector, c, what=(ACCOUNTS, BALANCES), months=MONTHS)
                    for c in clients}

    extracts = asyncio.run(scenario())
    assert extracts[kept.org_number].error is None
    error = extracts[revoked.org_number].error
    assert isinstance(error, ClientAccessError) and revoked.org_number in str(error)
    assert "erp-pipelines consent eaccounting" in str(error)
