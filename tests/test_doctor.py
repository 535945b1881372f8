"""`erp-pipelines doctor` against served sandboxes: the text and `--json` reports, the exit codes
(0 all good, 1 a client needs a fix, 2 a credential refused or a variable missing) and no secret
in any output."""

import datetime as dt
import json

import pytest
from contract.contract_support import serve_erp
from sandbox_env import tripletex_env
from secret_scan import SecretScan

from erp_pipelines.cli import main
from erp_pipelines.erps.tripletex import TripletexConnector
from erp_pipelines.registry import ERPS, api_erps
from erp_pipelines.sandbox.common import serve
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.tripletex import TripletexSandbox
from erp_pipelines.tokens import KEY_VARIABLE, TokenStore

CONSUMER_TOKEN = "consumer-DOCTOR-c0nsumer-token"
EMPLOYEE_TOKEN = "employee-DOCTOR-empl0yee-token"
WRONG_TOKEN = "wrong-DOCTOR-employee-token"
STORE_KEY = TokenStore.generate_key()
NO_API_ACCESS = TripletexConnector.onboarding_fix


def ledger(*, rejected_fixtures=True):
    return generate_ledger(4, first_month=dt.date(2026, 1, 1), last_month=dt.date(2026, 2, 1),
                           rejected_fixtures=rejected_fixtures)


@pytest.fixture
def outputs():
    """Every stdout and stderr doctor printed in the test, for the secret scan."""
    return []


def doctor(monkeypatch, capsys, outputs, env, *args):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(["doctor", *args])
    captured = capsys.readouterr()
    outputs += [captured.out, captured.err]
    return code, captured.out, captured.err


def served_tripletex(truth):
    sandbox = TripletexSandbox(truth, consumer_token=CONSUMER_TOKEN, accountant_employee_token=EMPLOYEE_TOKEN)
    return sandbox, serve(sandbox.app, path="/v2")


def assert_no_secret(sandbox, outputs):
    scan = SecretScan({
        "consumer token": CONSUMER_TOKEN, "employee token": EMPLOYEE_TOKEN, "wrong token": WRONG_TOKEN,
        "token store key": STORE_KEY,
        **{f"session token {i}": token for i, token in enumerate(sandbox.state.sessions)},
    }, basic_auth_usernames=["0", ""] + [str(t.erp_client_id) for t in sandbox.ledger.tenants])
    for n, text in enumerate(outputs):
        scan.text(f"doctor output {n}", text)
    assert scan.places == len(outputs) > 0
    assert scan.findings == []


def test_a_tenant_without_api_tilgang_exits_1_naming_the_client_and_the_fix(monkeypatch, capsys, outputs, tmp_path):
    truth = ledger()
    denied, good = truth.valid_tenants[1], truth.valid_tenants[0]
    sandbox, served = served_tripletex(truth)
    sandbox.set_api_access(denied.erp_client_id, False)
    with served as url:
        env = tripletex_env(sandbox, url, tmp_path, **{KEY_VARIABLE: STORE_KEY})
        code, out, _ = doctor(monkeypatch, capsys, outputs, env)
        json_code, json_out, _ = doctor(monkeypatch, capsys, outputs, env, "tripletex", "--json")

    assert code == json_code == 1
    assert "Tripletex (tripletex): credential OK" in out
    assert f"{len(truth.tenants)} client(s) reached" in out
    lines = out.splitlines()
    at = lines.index(f"  - {denied.name} (orgnr {denied.org_number}, tripletex client {denied.erp_client_id}): "
                     "no_api_access")
    assert lines[at + 1] == f"      NO: {NO_API_ACCESS.norwegian}"
    assert lines[at + 2] == f"      EN: {NO_API_ACCESS.english}"
    assert "Regnskap → Innstillinger → Regnskapsførers tilgang" in NO_API_ACCESS.norwegian
    assert "API-tilgang" in NO_API_ACCESS.norwegian and "Klienttilgang" in NO_API_ACCESS.norwegian
    assert good.name not in out  # only clients that need a fix are listed
    assert lines[-1] == "Some clients need a fix (exit 1)."

    document = json.loads(json_out)  # stdout holds the JSON document and nothing else
    assert document["exit_code"] == 1
    report = document["erps"]["tripletex"]
    assert (report["credential"], report["message"], report["clients_reached"]) == ("ok", None, len(truth.tenants))
    by_id = {c["erp_client_id"]: c for c in report["clients"]}
    assert set(by_id) == {str(t.erp_client_id) for t in truth.tenants}
    assert by_id[str(denied.erp_client_id)] | {"detail": None} == {
        "org_number": denied.org_number, "name": denied.name, "erp_client_id": str(denied.erp_client_id),
        "status": "no_api_access", "fix_no": NO_API_ACCESS.norwegian, "fix_en": NO_API_ACCESS.english, "detail": None,
    }
    assert "403" in by_id[str(denied.erp_client_id)]["detail"]
    for tenant in truth.valid_tenants:
        if tenant is not denied:
            assert by_id[str(tenant.erp_client_id)]["status"] == "ok"
    rejected = {t.erp_client_id for t in truth.tenants} - {t.erp_client_id for t in truth.valid_tenants}
    assert {by_id[str(i)]["status"] for i in rejected} == {"rejected"}
    assert all(by_id[str(i)]["fix_no"] and by_id[str(i)]["fix_en"] for i in rejected)
    # the probe: last month only, one balances request per client with access, per doctor run
    balance_reads = sandbox.stats.requests(template="GET /v2/balanceSheet")
    assert len(balance_reads) == 2 * (len(truth.valid_tenants) - 1)
    assert str(denied.erp_client_id) not in {r.tenant for r in balance_reads}
    assert_no_secret(sandbox, outputs)


def test_all_good_exits_0(monkeypatch, capsys, outputs, tmp_path):
    truth = ledger(rejected_fixtures=False)
    sandbox, served = served_tripletex(truth)
    with served as url:
        env = tripletex_env(sandbox, url, tmp_path, **{KEY_VARIABLE: STORE_KEY})
        code, out, _ = doctor(monkeypatch, capsys, outputs, env)
        json_code, json_out, _ = doctor(monkeypatch, capsys, outputs, env, "--json")

    assert (code, json_code) == (0, 0)
    assert out.splitlines() == [
        "Tripletex (tripletex): credential OK", f"  {len(truth.tenants)} client(s) reached; 0 need(s) a fix", "All good.",
    ]
    document = json.loads(json_out)
    assert document["exit_code"] == 0
    assert sorted(c["org_number"] for c in document["erps"]["tripletex"]["clients"] if c["status"] == "ok") == sorted(
        t.org_number for t in truth.tenants)
    assert_no_secret(sandbox, outputs)


def test_a_refused_credential_exits_2_naming_the_variable(monkeypatch, capsys, outputs, tmp_path):
    truth = ledger()
    sandbox, served = served_tripletex(truth)
    with served as url:
        env = tripletex_env(sandbox, url, tmp_path, TRIPLETEX_EMPLOYEE_TOKEN=WRONG_TOKEN, **{KEY_VARIABLE: STORE_KEY})
        code, out, _ = doctor(monkeypatch, capsys, outputs, env)
        json_code, json_out, _ = doctor(monkeypatch, capsys, outputs, env, "--json")

    assert (code, json_code) == (2, 2)
    assert out.startswith("Tripletex (tripletex): credential REFUSED: ")
    assert "TRIPLETEX_EMPLOYEE_TOKEN" in out
    report = json.loads(json_out)["erps"]["tripletex"]
    assert (report["credential"], report["clients"]) == ("refused", [])
    assert "TRIPLETEX_EMPLOYEE_TOKEN" in report["message"]
    assert_no_secret(sandbox, outputs)


def test_a_missing_variable_exits_2_naming_it(monkeypatch, capsys, outputs, tmp_path):
    truth = ledger()
    sandbox, served = served_tripletex(truth)
    with served as url:
        env = tripletex_env(sandbox, url, tmp_path, **{KEY_VARIABLE: STORE_KEY})
        del env["TRIPLETEX_CONSUMER_TOKEN"]
        code, out, _ = doctor(monkeypatch, capsys, outputs, env)
        json_code, json_out, _ = doctor(monkeypatch, capsys, outputs, env, "--json")

    assert (code, json_code) == (2, 2)
    assert "configuration incomplete" in out and "TRIPLETEX_CONSUMER_TOKEN is not set" in out
    report = json.loads(json_out)["erps"]["tripletex"]
    assert report["credential"] == "missing_variable" and "TRIPLETEX_CONSUMER_TOKEN" in report["message"]
    assert sandbox.stats.total == 0, "nothing is asked of the ERP without its variables"
    assert_no_secret(sandbox, outputs)


def test_no_configured_erp_or_an_unknown_one_exits_2(monkeypatch, capsys, outputs, tmp_path):
    code, out, err = doctor(monkeypatch, capsys, outputs, {"ERP_WAREHOUSE_PATH": str(tmp_path / "w.duckdb")})
    assert (code, out) == (2, "") and "no ERP is configured" in err
    code, out, err = doctor(monkeypatch, capsys, outputs, {}, "--json")
    assert code == 2 and json.loads(out)["exit_code"] == 2
    code, _, err = doctor(monkeypatch, capsys, outputs, {}, "no-such-erp")
    assert code == 2 and "unknown ERP 'no-such-erp'" in err


@pytest.mark.parametrize("erp", [spec.name for spec in api_erps()])
def test_every_api_erp_reports_a_client_that_withdrew_access_with_its_bilingual_fix(erp, monkeypatch, capsys,
                                                                                      outputs, tmp_path):
    fix = ERPS[erp].connector_class.onboarding_fix
    assert fix is not None and fix.norwegian and fix.english
    with serve_erp(erp, tmp_path, tenants=3) as served:
        denied = served.ledger.valid_tenants[1]
        served.simulator.deny_access(denied)
        code, json_out, _ = doctor(monkeypatch, capsys, outputs, served.environment, erp, "--json")
        environment = served.environment

    assert code == 1
    report = json.loads(json_out)["erps"][erp]
    assert report["credential"] == "ok"
    refused = [c for c in report["clients"] if c["status"] == "no_api_access"]
    assert len(refused) == 1
    assert (refused[0]["fix_no"], refused[0]["fix_en"]) == (fix.norwegian, fix.english)
    assert served.simulator.deny_access_fix in refused[0]["detail"]
    ok = {c["org_number"] for c in report["clients"] if c["status"] == "ok"}
    assert ok == {t.org_number for t in served.ledger.valid_tenants} - {denied.org_number}
    secrets = [value for name, value in environment.items() if name in served.secret_variables | {KEY_VARIABLE}]
    assert secrets and not [s for s in secrets if any(s in text for text in outputs)]
