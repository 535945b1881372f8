"""Secrets never leak: a demo-sized materialisation with distinctive secret values, then a scan of
every place a run leaves traces (tests/secret_scan.py)."""

import datetime as dt
import logging
import uuid

import dagster as dg
import pytest
from secret_scan import SecretScan

from erp_pipelines.defs.assets import tenant_failure_messages
from erp_pipelines.defs.build import build_definitions
from erp_pipelines.defs.runs import RANGE_END, RANGE_START
from erp_pipelines.model import add_months
from erp_pipelines.sandbox.common import serve
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.tripletex import TripletexSandbox
from erp_pipelines.tokens import TokenStore

THIS_MONTH = dt.date.today().replace(day=1)
FIRST_MONTH = add_months(THIS_MONTH, -2)
LOGGERS = ("", "httpx", "httpcore", "uvicorn", "uvicorn.error", "uvicorn.access", "dagster", "erp_pipelines",
           "filelock", "asyncio")
TENANTS = ("accounts", "balances")


@pytest.fixture
def every_log_record(caplog):
    """caplog's handler on every logger that matters, at DEBUG (some do not propagate to root)."""
    attached = []
    for name in LOGGERS:
        logger = logging.getLogger(name)
        attached.append((logger, logger.level))
        logger.setLevel(logging.DEBUG)
        if name:
            logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.DEBUG)
    yield caplog
    for logger, level in attached:
        logger.setLevel(level)
        if logger.name != "root":
            logger.removeHandler(caplog.handler)


def test_no_secret_in_logs_events_run_config_ui_storage_or_duckdb(tmp_path, monkeypatch, every_log_record, capfd):
    marker = uuid.uuid4().hex[:12]
    consumer_token = f"consumer-LEAK-{marker}-c0nsumer"
    employee_token = f"employee-LEAK-{marker}-empl0yee"
    wrong_token = f"wrong-employee-LEAK-{marker}"
    store_key = TokenStore.generate_key()
    ledger = generate_ledger(10, first_month=FIRST_MONTH, last_month=THIS_MONTH)
    sandbox = TripletexSandbox(ledger, consumer_token=consumer_token, accountant_employee_token=employee_token)
    failing = ledger.valid_tenants[4]
    sandbox.set_api_access(failing.erp_client_id, False)  # one tenant fails (403), with its fix

    data = tmp_path / "data"
    (tmp_path / "dagster").mkdir()
    with serve(sandbox.app, path="/v2") as url, dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        env = {
            "ERP_WAREHOUSE_PATH": str(data / "warehouse.duckdb"),
            "ERP_SOURCES": "tripletex",
            "TRIPLETEX_BASE_URL": url,
            "TRIPLETEX_CONSUMER_TOKEN": consumer_token,
            "TRIPLETEX_EMPLOYEE_TOKEN": employee_token,
            "TRIPLETEX_HISTORY_START": FIRST_MONTH.isoformat(),
            "ERP_TOKEN_STORE_KEY": store_key,
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        defs = build_definitions(env)
        job = defs.resolve_implicit_global_asset_job_def()
        clients = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey(["tripletex", "clients"])])
        assert clients.success
        keys = instance.get_dynamic_partitions("tripletex_tenants")
        assert len(keys) == len(ledger.valid_tenants)  # the shared number's holder included

        def materialise(config):
            return job.execute_in_process(
                instance=instance,
                asset_selection=[dg.AssetKey(["tripletex", name]) for name in TENANTS],
                tags={RANGE_START: keys[0], RANGE_END: keys[-1]},
                run_config={"ops": {"tripletex__accounts_and_balances": {"config": config}}},
                raise_on_error=False,
            )

        full = materialise({"full_sync": True})
        daily = materialise({})
        for result in (full, daily):
            # the one tenant without API-tilgang is skipped with a failure event on its partition; the others land
            assert result.success
            assert any(failing.name in message for message in tenant_failure_messages(result.all_events))
        landed = {row[0] for row in defs.resources["warehouse"].get().query("SELECT DISTINCT org_number FROM balances")}
        assert landed == set(keys) - {failing.org_number}

        sensor = defs.resolve_sensor_def("tripletex_client_access_sensor")
        sensor(dg.build_sensor_context(instance=instance, definitions=defs, resources=defs.resources))

        # a rejected credential: the error names the variable, never the value
        monkeypatch.setenv("TRIPLETEX_EMPLOYEE_TOKEN", wrong_token)
        refused = build_definitions({**env, "TRIPLETEX_EMPLOYEE_TOKEN": wrong_token}).resolve_implicit_global_asset_job_def()
        bad = refused.execute_in_process(instance=instance, asset_selection=[dg.AssetKey(["tripletex", "clients"])],
                                         raise_on_error=False)
        assert not bad.success
        bad_failure = next(e for e in bad.all_events if e.is_step_failure)
        assert "TRIPLETEX_EMPLOYEE_TOKEN" in bad_failure.step_failure_data.error.to_string()

        # the session tokens the sandbox minted: one for all the good runs (cached in the token store)
        session_tokens = list(sandbox.state.sessions)
        minted = sandbox.stats.requests(template="POST /v2/token/session/:create", status=201)
        assert len(minted) == 1, "every run reuses the session cached in the token store"
        assert session_tokens

        scan = SecretScan({
            "consumer token": consumer_token,
            "employee token": employee_token,
            "wrong employee token": wrong_token,
            "token store key": store_key,
            **{f"session token {i}": token for i, token in enumerate(session_tokens)},
        }, basic_auth_usernames=["0", ""] + [str(t.erp_client_id) for t in ledger.tenants])
        captured = capfd.readouterr()
        scan.text("stdout", captured.out)
        scan.text("stderr", captured.err)
        scan.text("captured log text", every_log_record.text)
        for record in every_log_record.records:
            scan.text(f"log record {record.name}", f"{record.getMessage()} {record.exc_text or ''} {record.args!r}")
        for result in (clients, full, daily, bad):
            for event in result.all_events:
                scan.text(f"event {event.event_type_value}", repr(event))
        scan.dagster_instance(instance)
        scan.dagster_definitions(defs)
        scan.duckdb(data / "warehouse.duckdb")
        scan.files(data, label="data dir")  # the warehouse, the token store (encrypted) and lock files

    assert scan.places > 100
    assert scan.findings == [], scan.report()
    assert (data / "tokens.enc").exists()


def test_the_scan_finds_a_planted_secret(tmp_path):
    """The scanner itself works: plain, encoded and Basic-auth forms are found, in text and files."""
    import base64

    scan = SecretScan({"token": "s3cret-token-value"}, basic_auth_usernames=["80001"])
    assert scan.text("plain", "…s3cret-token-value…")
    assert scan.text("url", "x?token=s3cret-token-value")
    assert scan.text("basic", "Authorization: Basic " + base64.b64encode(b"80001:s3cret-token-value").decode())
    (tmp_path / "f.bin").write_bytes(b"\x00\x01s3cret-token-value")
    assert scan.files(tmp_path)
    assert not scan.text("clean", "nothing to see")


def test_an_erp_echoing_a_token_in_its_error_body_cannot_carry_it_into_a_message():
    """Second line of defence: connectors register their credentials, and every ErpError message is
    redacted, so an ERP that echoes a token back (in `message`) leaks it nowhere."""
    import asyncio

    import httpx

    from erp_pipelines.erps.tripletex import TripletexConnector
    from erp_pipelines.errors import AuthError

    consumer = f"echoed-consumer-{uuid.uuid4().hex}"

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"status": 422, "code": 18000,
                                         "message": f"consumerToken {consumer} is not valid here",
                                         "validationMessages": [{"field": "consumerToken",
                                                                 "message": "The consumer token is invalid."}]})

    async def scenario():
        async with TripletexConnector(base_url="http://tripletex.test/v2", consumer_token=consumer,
                                      employee_token=f"employee-{uuid.uuid4().hex}",
                                      transport=httpx.MockTransport(answer)) as connector:
            await connector.list_clients()

    with pytest.raises(AuthError) as caught:
        asyncio.run(scenario())
    message = str(caught.value)
    assert consumer not in message and consumer not in caught.value.detail
    assert "[redacted]" in message and "TRIPLETEX_CONSUMER_TOKEN" in message
