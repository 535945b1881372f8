"""Fiken: the OAuth consent command, OAuth runs with rotating refresh tokens, reskontro and øre."""

import asyncio
import datetime as dt
import subprocess
from decimal import Decimal

import pytest
from consent_support import free_port, run_consent

from erp_pipelines import connections
from erp_pipelines.config import connector_from_environment
from erp_pipelines.erps.fiken import merge_subledgers
from erp_pipelines.errors import AuthError, BadResponse
from erp_pipelines.model import classify_clients, months_between
from erp_pipelines.sandbox.fiken import FikenSandbox
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.tokens import KEY_VARIABLE, PATH_VARIABLE, TokenStore

MONTHS = months_between(dt.date(2025, 11, 1), dt.date(2026, 2, 1))


@pytest.fixture
def fiken(tmp_path):
    ledger = generate_ledger(3, first_month=dt.date(2025, 6, 1), last_month=MONTHS[-1])
    sandbox = FikenSandbox(ledger)
    with sandbox.serve() as url:
        env = {k: v for k, v in sandbox.environment(url).items() if k != "FIKEN_API_TOKEN"}  # OAuth only
        env.update({PATH_VARIABLE: str(tmp_path / "tokens.enc"), KEY_VARIABLE: TokenStore.generate_key(),
                    "FIKEN_REDIRECT_URI": f"http://127.0.0.1:{free_port()}/callback"})
        yield sandbox, ledger, env


def consent(env: dict[str, str]) -> subprocess.CompletedProcess:
    """`erp-pipelines consent fiken --no-browser`, answering the login as the user's browser would."""
    return run_consent("fiken", env)


def test_consent_prints_the_url_stores_the_tokens_and_names_the_companies(fiken):
    sandbox, ledger, env = fiken
    result = consent(env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith(env["FIKEN_OAUTH_URL"] + "/authorize?") for line in lines)
    for tenant in ledger.valid_tenants:
        assert f"{tenant.name} (orgnr {tenant.org_number}): consented" in result.stdout
    assert "Feil Kontrollsiffer AS" in result.stdout and "refused" in result.stdout
    stored = TokenStore(env[PATH_VARIABLE], key=env[KEY_VARIABLE])
    connector = connector_from_environment("fiken", env)
    assert stored.get(connector.consent_entry())["refresh_token"]
    for secret in (sandbox.client_secret,):
        assert secret not in result.stdout + result.stderr


def test_a_stored_connection_gets_its_own_consent_and_runs_on_it(fiken):
    """A second firm's Fiken app, stored as a connection (no FIKEN_ variable in the environment):
    `consent fiken --connection NAME` stores the tokens under that connection, and its connector
    lists the companies with them."""
    sandbox, ledger, env = fiken
    firm = {k: v for k, v in env.items() if not k.startswith("FIKEN_")}
    store = TokenStore(env[PATH_VARIABLE], key=env[KEY_VARIABLE])
    settings = "".join(f"{k}={v}\n" for k, v in env.items() if k.startswith("FIKEN_"))
    connections.add_connection(store, "fiken", "Byrå AS", settings)

    unknown = run_consent("fiken", firm, "--connection", "Annen Byrå")
    assert unknown.returncode == 2 and "no connection named 'Annen Byrå'" in unknown.stdout
    assert "use one of: Byrå AS" in unknown.stdout

    result = run_consent("fiken", firm, "--connection", "Byrå AS")
    assert result.returncode == 0, result.stdout + result.stderr
    for tenant in ledger.valid_tenants:
        assert f"{tenant.name} (orgnr {tenant.org_number}): consented" in result.stdout
    assert sandbox.client_secret not in result.stdout + result.stderr

    connection = connections.connection_named("fiken", "byra-as", firm, store)
    connector = connection.connector(store)
    assert store.scoped(connections.tokens_prefix("fiken", "byra-as")).get(connector.consent_entry())["refresh_token"]
    assert store.get(connector.consent_entry()) is None  # not the environment's connection

    async def listed():
        async with connection.connector(store) as firm_connector:
            return await firm_connector.list_clients()

    assert {c.org_number for c in asyncio.run(listed())} == {t.org_number for t in ledger.tenants}


def test_an_oauth_run_refreshes_rotating_tokens_and_lands_exact_balances(fiken):
    sandbox, ledger, env = fiken
    assert consent(env).returncode == 0
    store = TokenStore(env[PATH_VARIABLE], key=env[KEY_VARIABLE])
    entry = connector_from_environment("fiken", env).consent_entry()
    consented = store.get(entry)["refresh_token"]

    async def run():
        async with connector_from_environment("fiken", env) as connector:
            clients = [c for c in classify_clients(await connector.list_clients()) if c.is_active]
            sandbox.expire_tokens()  # the access token dies: one refresh, whose new refresh token is stored
            return clients, {c.org_number: await connector.fetch_balances(c, MONTHS) for c in clients}

    clients, balances = asyncio.run(run())
    assert len(clients) == len(ledger.valid_tenants)  # the valid ones, the shared number's holder included
    for tenant in ledger.valid_tenants:
        got = sorted((b for b in balances[tenant.org_number] if not b.is_zero), key=lambda b: (b.period, b.account_number))
        assert got == sorted(tenant.expected_balances(MONTHS), key=lambda b: (b.period, b.account_number))
    rotated = store.get(entry)["refresh_token"]
    assert rotated != consented  # the old one is dead at the sandbox now: only the stored one works

    async def next_run():
        sandbox.expire_tokens()
        async with connector_from_environment("fiken", env) as connector:
            return await connector.list_clients()

    assert len(asyncio.run(next_run())) == len(ledger.tenants)
    assert store.get(entry)["refresh_token"] not in (consented, rotated)


def test_a_consent_that_reaches_no_valid_company_is_refused_and_nothing_stored(fiken):
    sandbox, ledger, env = fiken
    sandbox.set_consent_companies([t.erp_client_id for t in ledger.tenants if t.expected_status == "rejected"][:2])
    result = consent(env)
    assert result.returncode == 1
    assert "no company with a valid, unique organisation number" in result.stdout
    connector = connector_from_environment("fiken", env)
    assert TokenStore(env[PATH_VARIABLE], key=env[KEY_VARIABLE]).get(connector.consent_entry()) is None


def test_without_a_consent_the_run_says_how_to_give_it(fiken):
    _, _, env = fiken

    async def run():
        async with connector_from_environment("fiken", env) as connector:
            await connector.list_clients()

    with pytest.raises(AuthError, match="erp-pipelines consent fiken"):
        asyncio.run(run())


def test_reskontro_sub_accounts_count_once_in_their_account():
    assert merge_subledgers({"1500:10001": Decimal("1.00"), "1500:10002": Decimal("2.50"), "1920": Decimal(9)}) == {
        "1500": Decimal("3.50"), "1920": Decimal(9)}
    # the account listed beside its sub-accounts as their total is not counted twice
    assert merge_subledgers({"1500": Decimal("3.50"), "1500:10001": Decimal("1.00"), "1500:10002": Decimal("2.50")}) == {
        "1500": Decimal("3.50")}
    # postings without a sub-ledger beside the sub-accounts are added
    assert merge_subledgers({"1500": Decimal("1.00"), "1500:10001": Decimal("2.00")}) == {"1500": Decimal("3.00")}


def test_amounts_in_ore_become_exact_kroner_and_fractions_are_refused():
    from erp_pipelines.erps.fiken import _nok

    assert _nok(16250050, "T") == Decimal("162500.50")
    assert _nok(-5, "T") == Decimal("-0.05")
    with pytest.raises(BadResponse, match="not a whole number of øre"):
        _nok(Decimal("10.5"), "T")
