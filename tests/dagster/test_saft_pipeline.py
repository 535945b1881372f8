"""SAF-T Financial files through Dagster: drop folder → partitions → accounts, balances and the
reconciliation report in the warehouse."""

import datetime as dt
import logging
import os
import shutil
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

from erp_pipelines.defs.build import build_definitions
from erp_pipelines.defs.runs import RANGE_END, RANGE_START
from erp_pipelines.model import months_between
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.saft import write_saft_file, zip_file
from erp_pipelines.warehouse import Warehouse

EXAMPLES = Path(__file__).resolve().parents[1] / "erps" / "saft_examples"
EXAMPLE_888 = EXAMPLES / "ExampleFile SAF-T Financial_888888888_20180228235959.xml"
EXAMPLE_999 = EXAMPLES / "ExampleFile SAF-T Financial_999999999_20161125213512.xml"
YEAR_2025 = months_between(dt.date(2025, 1, 1), dt.date(2025, 12, 1))


@pytest.fixture
def saft(tmp_path, monkeypatch):
    drop = tmp_path / "drop"
    drop.mkdir()
    shutil.copy(EXAMPLE_888, drop)
    shutil.copy(EXAMPLE_999, drop)
    ledger = generate_ledger(2, first_month=dt.date(2025, 1, 1), last_month=dt.date(2025, 12, 1),
                             rejected_fixtures=False, client_id_base=70_000)
    generated = ledger.tenants[0]
    write_saft_file(generated, drop / f"SAF-T_{generated.org_number}_2025.xml", "1.30", 2025)
    env = {"ERP_WAREHOUSE_PATH": str(tmp_path / "w.duckdb"), "SAFT_DROP_DIR": str(drop), "ERP_SOURCES": "saft"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    defs = build_definitions(env)
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        yield SimpleNamespace(
            drop=drop, ledger=ledger, generated=generated, defs=defs, instance=instance,
            job=defs.resolve_implicit_global_asset_job_def(), warehouse=Warehouse(env["ERP_WAREHOUSE_PATH"]),
        )


def import_all(s):
    assert s.job.execute_in_process(instance=s.instance, asset_selection=[dg.AssetKey(["saft", "clients"])]).success
    keys = s.instance.get_dynamic_partitions("saft_tenants")
    result = s.job.execute_in_process(
        instance=s.instance,
        asset_selection=[dg.AssetKey(["saft", "accounts"]), dg.AssetKey(["saft", "balances"])],
        tags={RANGE_START: keys[0], RANGE_END: keys[-1]},
        raise_on_error=False,  # the official examples fail the blocking trial_balance check
    )
    return keys, result


def balances_of(s, org):
    return s.warehouse.query(
        "SELECT period, account_number, opening, movement, closing FROM balances WHERE erp = 'saft' "
        "AND org_number = ? ORDER BY ALL", [org])


def test_drop_folder_files_become_tenants_with_balances_and_reconciliation(saft):
    keys, result = import_all(saft)
    assert sorted(keys) == sorted(["888888888", "999999999", saft.generated.org_number])
    # the official examples' known mismatches land, then fail the blocking trial_balance check (the step fails)
    assert not result.success
    assert {e.partition for e in result.asset_materializations_for_node("saft__accounts_and_balances")} == set(keys)
    (failed,) = [e for e in result.get_asset_check_evaluations() if not e.passed]
    assert failed.check_name == "trial_balance" and failed.metadata["tenants_failing"].value == 2
    assert failed.metadata["off_by_nok"].value == "2545410.00"  # 888888888's openings

    expected = sorted((b.period, b.account_number, b.opening, b.movement, b.closing)
                      for b in saft.generated.expected_balances(YEAR_2025))
    assert balances_of(saft, saft.generated.org_number) == expected

    # the default window of a file source is every month its files cover (2017-01..04 here)
    periods = saft.warehouse.query("SELECT DISTINCT period FROM balances WHERE org_number = '888888888' ORDER BY 1")
    assert periods == [(dt.date(2017, m, 1),) for m in (1, 2, 3, 4)]

    findings = saft.warehouse.query(
        "SELECT check_name, account_number, expected, actual FROM reconciliation "
        "WHERE org_number = '888888888' ORDER BY check_name, account_number")
    assert findings == [
        ("closing_balance", "1920", Decimal("670568.75"), Decimal("724407.00")),
        ("closing_balance", "2711", Decimal("0.00"), Decimal("-0.35")),
        ("closing_balance", "2740", Decimal("0.00"), Decimal("0.35")),
        ("opening_trial_balance", None, Decimal("0.00"), Decimal("2545410.00")),
    ]
    assert saft.warehouse.query(
        "SELECT count(*) FROM reconciliation WHERE org_number = ?", [saft.generated.org_number]) == [(0,)]
    event = next(
        e for e in result.asset_materializations_for_node("saft__accounts_and_balances")
        if e.partition == "888888888" and e.asset_key == dg.AssetKey(["saft", "balances"])
    )
    assert event.metadata["reconciliation_findings"].value == 4
    standard = {row[0]: row[1:] for row in saft.warehouse.query(
        "SELECT account_number, standard_account, grouping_category, grouping_code, account_class FROM accounts "
        "WHERE org_number = '888888888'")}
    assert standard["1920"] == (None, "StandardAccountID", "19", "asset")  # a 2-digit 1.20 StandardAccountID


def test_redrop_is_idempotent_and_a_corrected_file_replaces_its_window(saft):
    import_all(saft)
    sensor = saft.defs.resolve_sensor_def("saft_client_access_sensor")

    def tick():
        return sensor(dg.build_sensor_context(instance=saft.instance, cursor=cursor,
                                               definitions=saft.defs, resources=saft.defs.resources))

    cursor = None
    first = tick()
    assert first.run_requests == []  # everything is imported already
    cursor = first.cursor
    before = saft.warehouse.query("SELECT * EXCLUDE (extracted_at, run_id) FROM balances ORDER BY ALL")

    # the same file dropped again (new mtime, same content) changes nothing
    path = saft.drop / f"SAF-T_{saft.generated.org_number}_2025.xml"
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 60))
    again = tick()
    assert again.run_requests == []
    cursor = again.cursor

    # a corrected export of the same company and year: a re-import is requested and replaces the year
    corrected_ledger = generate_ledger(2, seed=99, first_month=dt.date(2025, 1, 1),
                                       last_month=dt.date(2025, 12, 1), rejected_fixtures=False)
    corrected = corrected_ledger.tenants[0]
    corrected.org_number, corrected.name = saft.generated.org_number, saft.generated.name
    write_saft_file(corrected, path, "1.30", 2025)
    changed = tick()
    assert [(r.tags[RANGE_START], r.tags[RANGE_END]) for r in changed.run_requests] == [
        (saft.generated.org_number, saft.generated.org_number)]
    request = changed.run_requests[0]
    assert saft.job.execute_in_process(instance=saft.instance, asset_selection=list(request.asset_selection),
                                       tags=request.tags, run_config=request.run_config).success
    expected = sorted((b.period, b.account_number, b.opening, b.movement, b.closing)
                      for b in corrected.expected_balances(YEAR_2025))
    assert balances_of(saft, saft.generated.org_number) == expected
    untouched = saft.warehouse.query(
        "SELECT * EXCLUDE (extracted_at, run_id) FROM balances WHERE org_number <> ? ORDER BY ALL",
        [saft.generated.org_number])
    assert untouched == [row for row in before if row[1] != saft.generated.org_number]


def test_new_file_is_picked_up_and_invalid_org_number_is_rejected(saft):
    import_all(saft)
    sensor = saft.defs.resolve_sensor_def("saft_client_access_sensor")
    newcomer = saft.ledger.tenants[1]
    write_saft_file(newcomer, saft.drop / "new-export.xml", "1.20", 2025)
    bad = saft.drop / "bad-orgnr.xml"
    text = EXAMPLE_999.read_text(encoding="utf-8").replace("999999999", "999999998")
    bad.write_text(text, encoding="utf-8")

    result = sensor(dg.build_sensor_context(instance=saft.instance, definitions=saft.defs,
                                            resources=saft.defs.resources))
    assert [r.partition_keys for r in result.dynamic_partitions_requests] == [[newcomer.org_number]]
    assert [(r.tags[RANGE_START], r.tags[RANGE_END]) for r in result.run_requests] == [
        (newcomer.org_number, newcomer.org_number)]
    reason = saft.warehouse.query("SELECT status, status_reason FROM clients WHERE org_number = '999999998'")
    assert reason[0][0] == "rejected" and "mod-11" in reason[0][1]


def test_headless_cli_registers_and_imports_one_file(tmp_path):
    import subprocess
    import sys

    drop = tmp_path / "drop"
    drop.mkdir()
    shutil.copy(EXAMPLE_888, drop)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "ERP_WAREHOUSE_PATH": str(tmp_path / "w.duckdb"), "SAFT_DROP_DIR": str(drop),
           "DAGSTER_HOME": str(home)}
    dagster = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "erp_pipelines.definitions"]
    for args, succeeds in ((["--select", "saft/clients"], True),
                           (["--select", "saft/accounts,saft/balances", "--partition", "888888888"], False)):
        done = subprocess.run(dagster + args, env=env, capture_output=True, text=True, timeout=300, check=False)
        # the example's known mismatch lands, then fails the blocking trial_balance check
        assert (done.returncode == 0) == succeeds, done.stderr[-3000:]
    assert "blocking asset check failed" in done.stderr and "saft/balances: trial_balance" in done.stderr
    warehouse = Warehouse(tmp_path / "w.duckdb")
    from erp_pipelines.erps.saft import import_file

    expected = sorted((b.period, b.account_number, b.opening, b.movement, b.closing)
                      for b in import_file(EXAMPLE_888).balances if not b.is_zero)
    assert len(expected) == 77  # 22 accounts × 4 months, less 11 rows that are zero throughout
    assert warehouse.query("SELECT period, account_number, opening, movement, closing FROM balances "
                           "WHERE org_number = '888888888' ORDER BY ALL") == expected
    assert warehouse.query("SELECT count(*) FROM reconciliation") == [(4,)]


def only_the_generated_file(saft) -> None:
    """Drop the official examples (their known mismatches fail the trial_balance check)."""
    for example in saft.drop.glob("ExampleFile*"):
        example.unlink()


def test_refused_and_ignored_files_show_in_metadata_and_warehouse(saft):
    only_the_generated_file(saft)
    (saft.drop / "ledger.xml").write_text("Konto;Navn;Saldo\n1920;Bank;100,00\n", encoding="utf-8")
    (saft.drop / "invoice.xml").write_text('<?xml version="1.0"?>\n<Invoice><ID>1</ID></Invoice>\n')
    (saft.drop / "notes.txt").write_text("ring regnskapsfører")
    keys, result = import_all(saft)
    assert result.success  # refused files never stop the other tenants
    assert keys == [saft.generated.org_number]
    clients_run = saft.instance.get_latest_materialization_event(dg.AssetKey(["saft", "clients"]))
    metadata = clients_run.asset_materialization.metadata
    assert (metadata["files_refused"].value, metadata["files_ignored"].value) == (2, 1)
    assert saft.warehouse.query("SELECT file_name, reason FROM refused_files ORDER BY file_name") == [
        ("invoice.xml", "not_saft"), ("ledger.xml", "not_xml"), ("notes.txt", "ignored_type")]
    table = metadata["refused_files"].value
    assert "| ledger.xml | not_xml |" in table and "| notes.txt | ignored_type |" in table
    # and in the run's event log, each with its reason and fix
    logged = [e.message for e in saft.instance.all_logs(clients_run.run_id) if e.level == logging.WARNING]
    for name, reason in (("invoice.xml", "not_saft"), ("ledger.xml", "not_xml"), ("notes.txt", "ignored_type")):
        assert any(name in message and f"[{reason}] Fix: " in message for message in logged), (name, logged)


def test_a_rezipped_identical_export_is_not_imported_again(saft):
    xml = saft.drop / f"SAF-T_{saft.generated.org_number}_2025.xml"
    zip_file(xml, member_time=(2026, 1, 1, 0, 0, 0))
    content = xml.read_bytes()
    xml.unlink()
    only_the_generated_file(saft)
    import_all(saft)
    sensor = saft.defs.resolve_sensor_def("saft_client_access_sensor")

    def tick(cursor):
        return sensor(dg.build_sensor_context(instance=saft.instance, cursor=cursor,
                                              definitions=saft.defs, resources=saft.defs.resources))

    first = tick(None)
    assert first.run_requests == []
    xml.write_bytes(content)  # the demo's restart: the same XML zipped again, new member timestamp
    zip_file(xml, member_time=(2026, 6, 1, 12, 0, 0))
    xml.unlink()
    assert tick(first.cursor).run_requests == []
