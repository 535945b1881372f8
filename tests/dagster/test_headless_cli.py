"""Headless, with the real CLI in subprocesses: `dagster asset materialize` registers the tenants, one
run fills the whole tenant range, and `--partition` fills one tenant."""

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from erp_pipelines.defs.runs import RANGE_END, RANGE_START
from erp_pipelines.model import add_months, months_between
from erp_pipelines.sandbox.common import serve
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.tripletex import TripletexSandbox
from erp_pipelines.warehouse import Warehouse

ROOT = Path(__file__).resolve().parents[2]
DAGSTER = Path(sys.executable).with_name("dagster")
THIS_MONTH = dt.date.today().replace(day=1)
WINDOW = months_between(add_months(THIS_MONTH, -1), THIS_MONTH)  # the default: previous and current month
EXTRACT = "tripletex/accounts,tripletex/balances"


@pytest.fixture
def headless(tmp_path):
    ledger = generate_ledger(5, first_month=WINDOW[0], last_month=THIS_MONTH)
    sandbox = TripletexSandbox(ledger)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with serve(sandbox.app, path="/v2") as url:
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "ERP_WAREHOUSE_PATH": str(tmp_path / "warehouse.duckdb"),
            "ERP_SOURCES": "tripletex",
            "TRIPLETEX_BASE_URL": url,
            "TRIPLETEX_CONSUMER_TOKEN": sandbox.consumer_token,
            "TRIPLETEX_EMPLOYEE_TOKEN": sandbox.accountant_employee_token,
            "ERP_TENANTS_PER_RUN": "2",  # chunks schedules and sensors; a CLI range is still one run
        }

        def materialize(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [str(DAGSTER), "asset", "materialize", "-m", "erp_pipelines.definitions", *args],
                check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
            )

        yield ledger, home, Warehouse(env["ERP_WAREHOUSE_PATH"]), materialize


def landed(warehouse, org_numbers):
    return warehouse.query(
        "SELECT org_number, period, account_number, opening, movement, closing FROM balances "
        "WHERE erp = 'tripletex' AND org_number IN (SELECT unnest(?::VARCHAR[])) "
        "AND (opening <> 0 OR movement <> 0 OR closing <> 0) ORDER BY ALL",
        [list(org_numbers)],
    )


def truth(tenants):
    return sorted(
        (tenant.org_number, b.period, b.account_number, b.opening, b.movement, b.closing)
        for tenant in tenants
        for b in tenant.expected_balances(WINDOW)
        if b.opening or b.movement or b.closing
    )


def extraction_runs(instance):
    return [run for run in instance.get_runs() if any(key.path[-1] != "clients" for key in run.asset_selection or ())]


def materialized_partitions(instance, run_id, asset):
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    return sorted(
        r.event_log_entry.dagster_event.partition
        for r in records
        if r.event_log_entry.dagster_event.asset_key == dg.AssetKey(["tripletex", asset])
    )


def test_one_cli_run_fills_the_whole_tenant_range_and_one_partition_refills_one_tenant(headless):
    ledger, home, warehouse, materialize = headless
    listed = materialize("--select", "tripletex/clients")
    assert listed.returncode == 0, listed.stderr[-3000:]

    with dg.DagsterInstance.from_config(str(home)) as instance:
        keys = instance.get_dynamic_partitions("tripletex_tenants")
    assert keys == [tenant.org_number for tenant in ledger.valid_tenants]

    filled = materialize("--select", EXTRACT, "--partition-range", f"{keys[0]}...{keys[-1]}")
    assert filled.returncode == 0, filled.stderr[-3000:]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (run,) = extraction_runs(instance)  # ONE run for every tenant, although ERP_TENANTS_PER_RUN=2
        assert (run.tags[RANGE_START], run.tags[RANGE_END]) == (keys[0], keys[-1])
        for asset in ("accounts", "balances"):
            assert materialized_partitions(instance, run.run_id, asset) == sorted(keys)
    assert landed(warehouse, keys) == truth(ledger.valid_tenants)
    assert warehouse.query("SELECT count(DISTINCT org_number) FROM accounts") == [(len(keys),)]

    # one tenant again, alone: its rows are replaced, the others' stay as they are
    one = ledger.valid_tenants[2]
    others = [key for key in keys if key != one.org_number]
    before = landed(warehouse, others)
    warehouse.query("DELETE FROM balances WHERE org_number = ?", [one.org_number])
    again = materialize("--select", EXTRACT, "--partition", one.org_number)
    assert again.returncode == 0, again.stderr[-3000:]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        latest = extraction_runs(instance)[0]  # newest first
        assert materialized_partitions(instance, latest.run_id, "balances") == [one.org_number]
    assert landed(warehouse, [one.org_number]) == truth([one])
    assert landed(warehouse, others) == before
