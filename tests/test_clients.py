"""Client management (erp_pipelines/clients.py, the warehouse's lifecycle and `erp-pipelines clients`):
statuses, the shared-number rule, activate/deactivate, purge ("Slett kontoer"), ERP_AUTO_ACTIVATE and
the migration of warehouse files from before the lifecycle."""

import datetime as dt
from decimal import Decimal

import duckdb
import pytest

from erp_pipelines import clients
from erp_pipelines import warehouse as warehouse_module
from erp_pipelines.cli import main
from erp_pipelines.model import Account, Balance, Client, ClientStatus, apply_number_rules, classify_clients
from erp_pipelines.sandbox.ledger import make_org_number
from erp_pipelines.warehouse import Warehouse

ERP = "tripletex"  # the command line accepts registered ERPs only
HOLDER, OTHER, THIRD = make_org_number(11), make_org_number(12), make_org_number(13)
JAN = dt.date(2026, 1, 1)


def client(number, client_id, name):
    return Client(ERP, number, client_id, name)


def statuses(warehouse):
    return {c.erp_client_id: c.status for c in warehouse.clients(ERP)}


def reasons(warehouse):
    return {c.erp_client_id: c.status_reason for c in warehouse.clients(ERP)}


def refresh(warehouse, listed, **options):
    return warehouse.record_clients(ERP, apply_number_rules(listed), **options)


@pytest.fixture
def warehouse(tmp_path, monkeypatch):
    monkeypatch.setenv("ERP_WAREHOUSE_PATH", str(tmp_path / "w.duckdb"))
    monkeypatch.delenv("ERP_AUTO_ACTIVATE", raising=False)
    return Warehouse(tmp_path / "w.duckdb")


def load_rows(warehouse, org):
    warehouse.replace_accounts(ERP, {org: [Account("1920", "Bank"), Account("3000", "Salg")]})
    warehouse.replace_balances(ERP, {org: [Balance(JAN, "1920", Decimal(1), Decimal(2), Decimal(3))]}, [JAN])
    warehouse.replace_reconciliation(ERP, {org: [{"check_name": "totals", "message": "differs"}]})


def cli(capsys, *argv):
    code = main(["clients", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------- shared numbers


def test_the_first_holder_keeps_its_number_and_a_newcomer_is_rejected_naming_it(warehouse):
    refresh(warehouse, [client(HOLDER, "500", "Ekte Klient AS")])
    change = refresh(warehouse, [client(HOLDER, "500", "Ekte Klient AS"), client(HOLDER, "20", "Kopi AS")])
    assert statuses(warehouse) == {"500": ClientStatus.ACTIVE, "20": ClientStatus.REJECTED}
    reason = reasons(warehouse)["20"]
    assert reason.startswith(f"organisation number {HOLDER} is held by tripletex client 500 (Ekte Klient AS)")
    assert "held the number first" in reason and f"clients activate tripletex {HOLDER} --client-id 20" in reason
    assert change.active == [HOLDER] and [c.erp_client_id for c in change.rejected] == ["20"]
    # the holder's rows keep landing: extraction outcomes touch the holder only
    warehouse.record_extraction_outcomes(ERP, succeeded=[HOLDER], failed={})
    assert [c.erp_client_id for c in warehouse.active_clients(ERP).values()] == ["500"]


def test_in_the_same_first_listing_the_lower_client_id_holds_the_number(warehouse):
    listed = [client(HOLDER, "10", "Dobbel Kopi AS"), client(HOLDER, "9", "Dobbel AS")]
    refresh(warehouse, listed)
    assert statuses(warehouse) == {"9": ClientStatus.ACTIVE, "10": ClientStatus.REJECTED}  # 9 < 10, numerically
    assert "both appeared in the same first listing and the lower ERP client id holds it" in reasons(warehouse)["10"]
    refresh(warehouse, listed)  # a later refresh keeps the holder and says the same
    assert statuses(warehouse)["9"] == ClientStatus.ACTIVE
    assert "same first listing" in reasons(warehouse)["10"]
    # the consent commands apply the same rule without a registry
    by_id = {c.erp_client_id: c for c in classify_clients(listed)}
    assert by_id["9"].status == ClientStatus.ACTIVE and by_id["10"].status == ClientStatus.REJECTED


def test_activate_moves_the_number_and_deactivates_the_holder(warehouse):
    listed = [client(HOLDER, "1", "Feil Kopi AS"), client(HOLDER, "2", "Riktig Klient AS")]
    refresh(warehouse, listed)
    code = main(["clients", "activate", ERP, HOLDER])  # two clients share it: which one?
    assert code == 1
    changes = clients.activate(warehouse, ERP, HOLDER, client_id="2", actor="kari")
    assert [(c.client.erp_client_id, c.before, c.after) for c in changes] == [
        ("2", ClientStatus.REJECTED, ClientStatus.ACTIVE), ("1", ClientStatus.ACTIVE, ClientStatus.INACTIVE)]
    assert statuses(warehouse) == {"1": ClientStatus.INACTIVE, "2": ClientStatus.ACTIVE}
    assert "moved to tripletex client 2 (Riktig Klient AS)" in reasons(warehouse)["1"]
    assert warehouse.enabled_never_extracted(ERP) == {HOLDER}  # the sensor reloads the history for client 2
    refresh(warehouse, listed)  # the ERP still lists both: the choice stands
    assert statuses(warehouse) == {"1": ClientStatus.INACTIVE, "2": ClientStatus.ACTIVE}
    audit = [(a["erp_client_id"], a["action"], a["actor"]) for a in warehouse.audit(ERP)]
    assert sorted(audit) == [("1", "deactivate", "kari"), ("2", "activate", "kari")]


def test_the_switch_is_one_transaction(warehouse, monkeypatch):
    refresh(warehouse, [client(HOLDER, "1", "Holder AS"), client(HOLDER, "2", "Newcomer AS")])
    before = warehouse.client_details(ERP)

    def fail_on_audit(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(warehouse_module, "_audit", fail_on_audit)  # after both updates, before commit
    with pytest.raises(RuntimeError):
        clients.activate(warehouse, ERP, HOLDER, client_id="2")
    assert warehouse.client_details(ERP) == before


# ---------------------------------------------------------------------------------------- activate, deactivate


def test_deactivate_and_activate_one_client_keeps_history_and_survives_refreshes(warehouse):
    listed = [client(HOLDER, "1", "Alfa AS"), client(OTHER, "2", "Beta AS")]
    refresh(warehouse, listed)
    load_rows(warehouse, HOLDER)
    (change,) = clients.deactivate(warehouse, ERP, HOLDER)
    assert (change.before, change.after) == (ClientStatus.ACTIVE, ClientStatus.INACTIVE)
    assert list(warehouse.active_clients(ERP)) == [OTHER]
    assert warehouse.tenant_row_counts(ERP, HOLDER) == {"accounts": 2, "balances": 1, "reconciliation": 1}
    refresh(warehouse, listed)
    assert statuses(warehouse)["1"] == ClientStatus.INACTIVE  # the user's choice survives a refresh
    refresh(warehouse, listed[1:])  # no longer listed: revoked ...
    assert statuses(warehouse)["1"] == ClientStatus.REVOKED
    refresh(warehouse, listed)  # ... and when listed again, still inactive
    assert statuses(warehouse)["1"] == ClientStatus.INACTIVE
    (change,) = clients.activate(warehouse, ERP, HOLDER)
    assert change.after == ClientStatus.ACTIVE and statuses(warehouse)["1"] == ClientStatus.ACTIVE
    assert clients.activate(warehouse, ERP, HOLDER)[0].note == "already active"


def test_all_variants_change_every_client_of_that_erp_only(warehouse):
    refresh(warehouse, [client(HOLDER, "1", "Alfa AS"), client(OTHER, "2", "Beta AS"), client("", "3", "Uten AS")])
    warehouse.record_clients("fiken", [Client("fiken", THIRD, "7", "Fiken AS")])
    changes = clients.deactivate(warehouse, ERP, all_clients=True)
    assert sorted(c.client.erp_client_id for c in changes) == ["1", "2"]
    assert statuses(warehouse) == {"1": "inactive", "2": "inactive", "3": "rejected"}
    assert warehouse.clients("fiken")[0].status == ClientStatus.ACTIVE
    changes = clients.activate(warehouse, ERP, all_clients=True)
    assert sorted(c.client.erp_client_id for c in changes if c.changed) == ["1", "2"]
    assert statuses(warehouse) == {"1": "active", "2": "active", "3": "rejected"}


def test_activate_refuses_rule_rejected_and_revoked_clients_with_the_fix(warehouse):
    bad = make_org_number(14)[:-1] + str((int(make_org_number(14)[-1]) + 1) % 10)
    refresh(warehouse, [client(bad, "1", "Feil Kontrollsiffer AS"), client(HOLDER, "2", "Borte AS")])
    refresh(warehouse, [client(bad, "1", "Feil Kontrollsiffer AS")])
    with pytest.raises(clients.ClientCommandError, match="fails the mod-11 check digit.*Fix: register a valid"):
        clients.activate(warehouse, ERP, bad)
    with pytest.raises(clients.ClientCommandError, match=r"Borte AS \(orgnr .*no longer listed.*grant"):
        clients.activate(warehouse, ERP, HOLDER)
    with pytest.raises(clients.ClientCommandError, match="no tripletex client with organisation number 123"):
        clients.activate(warehouse, ERP, "123")


def test_with_auto_activate_false_new_clients_wait_as_inactive(warehouse, monkeypatch):
    monkeypatch.setenv("ERP_AUTO_ACTIVATE", "false")
    change = refresh(warehouse, [client(HOLDER, "1", "Alfa AS"), client(OTHER, "2", "Beta AS")])
    assert change.active == [] and change.inactive == [HOLDER, OTHER] and change.registered == [HOLDER, OTHER]
    assert set(statuses(warehouse).values()) == {ClientStatus.INACTIVE}
    assert "ERP_AUTO_ACTIVATE=false" in reasons(warehouse)["1"]
    assert f"clients activate tripletex {HOLDER}" in reasons(warehouse)["1"]
    assert warehouse.active_clients(ERP) == {}
    clients.activate(warehouse, ERP, HOLDER)
    refresh(warehouse, [client(HOLDER, "1", "Alfa AS"), client(OTHER, "2", "Beta AS")])
    assert statuses(warehouse) == {"1": ClientStatus.ACTIVE, "2": ClientStatus.INACTIVE}


def test_auto_activate_is_validated_when_the_configuration_loads():
    from erp_pipelines.config import load_config
    from erp_pipelines.errors import ConfigError

    with pytest.raises(ConfigError, match="ERP_AUTO_ACTIVATE='maybe'.*Fix: set ERP_AUTO_ACTIVATE=true or false"):
        load_config({"ERP_AUTO_ACTIVATE": "maybe"})


# ---------------------------------------------------------------------------------------- purge


def test_purge_deletes_every_row_of_the_tenant_only_and_records_an_audit_row(warehouse):
    refresh(warehouse, [client(HOLDER, "1", "Alfa AS"), client(OTHER, "2", "Beta AS")])
    load_rows(warehouse, HOLDER)
    load_rows(warehouse, OTHER)
    warehouse.record_extraction_outcomes(ERP, succeeded=[HOLDER, OTHER], failed={})
    other_before = warehouse.tenant_row_counts(ERP, OTHER)

    with pytest.raises(clients.ClientCommandError, match=r"would delete 4 rows \(accounts: 2, balances: 1, "
                                                         r"reconciliation: 1\).*--yes"):
        clients.purge(warehouse, ERP, HOLDER, confirm=False)
    assert warehouse.tenant_row_counts(ERP, HOLDER) == {"accounts": 2, "balances": 1, "reconciliation": 1}

    result = clients.purge(warehouse, ERP, HOLDER, confirm=True, actor="kari")
    assert result.done and result.rows == {"accounts": 2, "balances": 1, "reconciliation": 1}
    assert warehouse.tenant_row_counts(ERP, HOLDER) == {"accounts": 0, "balances": 0, "reconciliation": 0}
    assert warehouse.tenant_row_counts(ERP, OTHER) == other_before
    (audit,) = warehouse.audit(ERP)
    assert (audit["action"], audit["org_number"], audit["rows_deleted"], audit["actor"]) == ("purge", HOLDER, 4, "kari")
    assert audit["detail"] == "accounts=2, balances=1, reconciliation=1" and audit["recorded_at"] is not None
    kept = {c["erp_client_id"]: c for c in warehouse.client_details(ERP)}
    assert kept["1"]["status"] == "inactive" and kept["1"]["last_extracted_at"] is None
    assert "Slett kontoer" in kept["1"]["status_reason"] and kept["2"]["status"] == "active"


# ---------------------------------------------------------------------------------------- migration


def test_a_warehouse_file_from_before_the_lifecycle_keeps_working(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("""CREATE TABLE clients (erp VARCHAR NOT NULL, org_number VARCHAR NOT NULL,
        erp_client_id VARCHAR NOT NULL, name VARCHAR, status VARCHAR NOT NULL, status_reason VARCHAR,
        first_seen_at TIMESTAMP NOT NULL, last_seen_at TIMESTAMP NOT NULL, revoked_at TIMESTAMP,
        last_extracted_at TIMESTAMP, last_error VARCHAR, last_error_at TIMESTAMP)""")
    now = dt.datetime(2026, 1, 1)
    con.execute("INSERT INTO clients VALUES (?, ?, '1', 'Alfa AS', 'ok', NULL, ?, ?, NULL, ?, NULL, NULL), "
                "(?, ?, '2', 'Beta AS', 'revoked', 'gone', ?, ?, ?, NULL, NULL, NULL)",
                [ERP, HOLDER, now, now, now, ERP, OTHER, now, now, now])
    con.close()
    warehouse = Warehouse(path)
    assert statuses(warehouse) == {"1": ClientStatus.ACTIVE, "2": ClientStatus.REVOKED}
    assert warehouse.query("SELECT DISTINCT status FROM clients ORDER BY 1") == [("active",), ("revoked",)]
    clients.deactivate(warehouse, ERP, HOLDER)
    assert statuses(warehouse)["1"] == ClientStatus.INACTIVE
    assert Warehouse(path).clients(ERP)[0].status == ClientStatus.INACTIVE  # reopened: migrations are idempotent


# ---------------------------------------------------------------------------------------- the command line


def test_cli_list_activate_deactivate_and_purge_end_to_end(warehouse, capsys):
    refresh(warehouse, [client(HOLDER, "1", "Alfa AS"), client(OTHER, "2", "Beta AS"), client(OTHER, "3", "Beta Kopi")])
    load_rows(warehouse, HOLDER)
    warehouse.record_extraction_outcomes(ERP, succeeded=[HOLDER], failed={})

    code, out, _ = cli(capsys, "list", ERP)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ERP", "NAME", "ORGNR", "CLIENT", "ID", "STATUS", "LAST", "EXTRACTION"]
    alfa = next(line for line in lines if "Alfa AS" in line)
    assert HOLDER in alfa and "active" in alfa and "UTC" in alfa
    assert f"reason: organisation number {OTHER} is held by tripletex client 2 (Beta AS)" in out
    assert "never" in next(line for line in lines if "Beta AS" in line)

    deactivated = f"Alfa AS (orgnr {HOLDER}, tripletex client 1): active -> inactive; history kept\n"
    assert cli(capsys, "deactivate", ERP, HOLDER)[:2] == (0, deactivated)
    code, out, _ = cli(capsys, "activate", ERP, OTHER, "--client-id", "3")
    assert code == 0 and "Beta Kopi" in out and "rejected -> active" in out and "active -> inactive" in out
    code, out, _ = cli(capsys, "activate", ERP, "--all")
    assert code == 0 and "Alfa AS" in out and "inactive -> active" in out
    assert "another client holds its number" in out  # Beta AS: its number is with Beta Kopi now
    code, out, _ = cli(capsys, "deactivate", ERP, "--all")
    assert code == 0 and set(statuses(warehouse).values()) == {ClientStatus.INACTIVE}

    code, _, err = cli(capsys, "purge", ERP, HOLDER)
    assert code == 1 and "would delete 4 rows" in err and "--yes" in err
    assert warehouse.tenant_row_counts(ERP, HOLDER)["accounts"] == 2
    code, out, _ = cli(capsys, "purge", ERP, HOLDER, "--yes")
    assert code == 0 and out == f"tripletex {HOLDER}: deleted 4 rows (accounts: 2, balances: 1, reconciliation: 1)\n"
    assert sum(warehouse.tenant_row_counts(ERP, HOLDER).values()) == 0


def test_cli_refusals_name_the_client_and_the_fix_with_exit_codes(warehouse, capsys):
    refresh(warehouse, [client(HOLDER, "1", "Alfa AS"), client("", "2", "Uten Orgnr AS")])
    code, _, err = cli(capsys, "activate", "nosuch", HOLDER)
    assert code == 2 and "unknown ERP 'nosuch'" in err
    code, _, err = cli(capsys, "activate", ERP)
    assert code == 2 and "either ORGNR or --all" in err
    code, _, err = cli(capsys, "deactivate", ERP, "987654325")
    assert code == 1 and "no tripletex client with organisation number 987654325" in err and "Fix:" in err
    code, _, err = cli(capsys, "purge", ERP, "987654325", "--yes")
    assert code == 1 and "is registered and no rows" in err
    with pytest.raises(SystemExit):  # --full is required: the daily window is the schedule's job
        main(["clients", "sync", ERP, HOLDER])
