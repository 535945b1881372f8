"""The token store: encrypted at rest, owner-only, atomic, shared safely across processes; and the
Tripletex connector caching its session in it."""

import asyncio
import datetime as dt
import multiprocessing
import os
import stat

import httpx
import pytest

from erp_pipelines.config import load_config
from erp_pipelines.erps.tripletex import TripletexConnector
from erp_pipelines.errors import ConfigError
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.tripletex import TripletexSandbox
from erp_pipelines.tokens import KEY_VARIABLE, TokenStore, credential_key, default_store_path

SECRET = "refresh-token-7f3a9c-do-not-print"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_round_trip_update_and_delete(tmp_path):
    key = TokenStore.generate_key()
    store = TokenStore(tmp_path / "tokens.enc", key=key)
    assert store.get("x") is None
    store.put("eaccounting:abc", {"refresh_token": SECRET, "expires": "2026-12-01"})
    store.put("tripletex-session:def", {"token": "t", "expires": "2026-11-23"})
    rotated = store.update("eaccounting:abc", lambda old: {**old, "refresh_token": SECRET + "-2"})
    assert rotated["refresh_token"] == SECRET + "-2"
    again = TokenStore(tmp_path / "tokens.enc", key=key)  # another instance (another run) reads it
    assert again.get("eaccounting:abc") == {"refresh_token": SECRET + "-2", "expires": "2026-12-01"}
    again.delete("tripletex-session:def")
    assert store.get("tripletex-session:def") is None
    assert store.update("eaccounting:abc", lambda old: None) is None and store.get("eaccounting:abc") is None


def test_file_is_owner_only_and_holds_no_plaintext(tmp_path):
    previous = os.umask(0o022)  # a permissive umask must not make the files readable by others
    try:
        store = TokenStore(tmp_path / "data" / "tokens.enc")  # no key configured: a generated key file
        store.put("eaccounting:abc", {"refresh_token": SECRET})
    finally:
        os.umask(previous)
    path, key_file = tmp_path / "data" / "tokens.enc", tmp_path / "data" / "tokens.key"
    assert mode(path) == 0o600 and mode(key_file) == 0o600
    raw = path.read_bytes()
    assert SECRET.encode() not in raw and b"refresh_token" not in raw and b"eaccounting" not in raw
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind
    # the generated key is reused, not replaced
    assert TokenStore(path).get("eaccounting:abc") == {"refresh_token": SECRET}


def test_wrong_key_is_a_clear_error_without_the_key(tmp_path):
    right, wrong = TokenStore.generate_key(), TokenStore.generate_key()
    TokenStore(tmp_path / "tokens.enc", key=right).put("a", {"token": SECRET})
    with pytest.raises(ConfigError) as caught:
        TokenStore(tmp_path / "tokens.enc", key=wrong).get("a")
    message = str(caught.value)
    assert "cannot be decrypted" in message and KEY_VARIABLE in message and str(tmp_path / "tokens.enc") in message
    assert "Fix:" in message
    assert wrong not in message and right not in message and SECRET not in message


def test_a_store_others_can_read_is_refused(tmp_path):
    store = TokenStore(tmp_path / "tokens.enc", key=TokenStore.generate_key())
    store.put("a", {"token": SECRET})
    os.chmod(tmp_path / "tokens.enc", 0o644)
    with pytest.raises(ConfigError, match="can be read by other users.*chmod 600"):
        store.get("a")


def test_invalid_key_in_configuration_names_the_variable():
    from erp_pipelines.tokens import validate_key

    with pytest.raises(ConfigError, match=KEY_VARIABLE) as caught:
        validate_key("not-a-fernet-key")
    assert "not-a-fernet-key" not in str(caught.value)


def test_default_path_is_next_to_the_warehouse(tmp_path):
    warehouse = tmp_path / "w" / "x.duckdb"
    assert default_store_path(warehouse, {}) == tmp_path / "w" / "tokens.enc"
    assert default_store_path(warehouse, {"ERP_TOKEN_STORE_PATH": "/srv/t.enc"}).as_posix() == "/srv/t.enc"
    # the configuration resolves the warehouse (ERP_WAREHOUSE_PATH or its default) for the store
    configured = load_config({"ERP_WAREHOUSE_PATH": str(warehouse)})
    assert configured.token_store_path == str(tmp_path / "w" / "tokens.enc")
    assert load_config({}).token_store_path == "data/tokens.enc"


def test_entry_names_are_hashes_not_credentials():
    name = credential_key("tripletex-session", "https://tripletex.no/v2", "consumer-secret", "employee-secret")
    assert name.startswith("tripletex-session:") and "secret" not in name
    assert name != credential_key("tripletex-session", "https://tripletex.no/v2", "consumer-secret", "other")


def _increment(path: str, key: str, times: int) -> None:
    store = TokenStore(path, key=key)
    for _ in range(times):
        store.update("counter", lambda old: {"n": (old or {"n": 0})["n"] + 1})


def test_concurrent_processes_never_lose_an_update(tmp_path):
    """Rotating refresh tokens need read-modify-write across runs: the lock and the atomic replace
    make four processes' 25 updates each add up."""
    key = TokenStore.generate_key()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_increment, args=(str(tmp_path / "tokens.enc"), key, 25)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    assert TokenStore(tmp_path / "tokens.enc", key=key).get("counter") == {"n": 100}


# ---------------------------------------------------------------------------------------- the connector


def connect(sandbox, store, **kwargs):
    return TripletexConnector(
        base_url="http://tripletex.sandbox/v2",
        consumer_token=sandbox.consumer_token,
        employee_token=sandbox.accountant_employee_token,
        transport=httpx.ASGITransport(app=sandbox.app),
        token_store=store,
        **kwargs,
    )


def sessions_created(sandbox) -> int:
    return len(sandbox.stats.requests(template="POST /v2/token/session/:create", status=201))


def test_connector_reuses_the_cached_session_across_instances(tmp_path):
    ledger = generate_ledger(3, first_month=dt.date(2026, 1, 1), last_month=dt.date(2026, 3, 1))
    sandbox = TripletexSandbox(ledger, today=dt.date(2026, 3, 10))
    store = TokenStore(tmp_path / "tokens.enc", key=TokenStore.generate_key())

    async def one_run():
        async with connect(sandbox, store, today=dt.date(2026, 3, 10)) as connector:
            await connector.list_clients()
            return connector.sessions_minted

    assert asyncio.run(one_run()) == 1
    assert asyncio.run(one_run()) == 0  # a second run (a new connector) reuses the stored session
    assert asyncio.run(one_run()) == 0
    assert sessions_created(sandbox) == 1
    (session_token,) = sandbox.state.sessions
    raw = (tmp_path / "tokens.enc").read_bytes()
    for secret in (session_token, sandbox.consumer_token, sandbox.accountant_employee_token):
        assert secret.encode() not in raw

    # the ERP forgot the session (expired early, or another environment): one 401, one new session
    sandbox.expire_all_sessions()
    assert asyncio.run(one_run()) == 1
    assert asyncio.run(one_run()) == 0
    assert sessions_created(sandbox) == 2


def test_a_cached_session_near_its_expiry_is_not_used(tmp_path):
    ledger = generate_ledger(3, first_month=dt.date(2026, 1, 1), last_month=dt.date(2026, 3, 1))
    sandbox = TripletexSandbox(ledger, today=dt.date(2026, 3, 10))
    store = TokenStore(tmp_path / "tokens.enc", key=TokenStore.generate_key())

    async def run_on(day):
        sandbox.today = day
        async with connect(sandbox, store, today=day) as connector:
            await connector.list_clients()
            return connector.sessions_minted

    assert asyncio.run(run_on(dt.date(2026, 3, 10))) == 1  # expires 2026-03-12
    assert asyncio.run(run_on(dt.date(2026, 3, 10))) == 0
    assert asyncio.run(run_on(dt.date(2026, 3, 11))) == 1  # the day before expiry: a new one
