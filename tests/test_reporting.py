"""The dbt reporting models (erp_pipelines/defs/reporting.py) on a Tripletex sandbox, through Dagster:
the views match the truth ledger to the øre, their dbt tests run as asset checks, and they sit
downstream of `tripletex/balances`."""

import datetime as dt
from collections import defaultdict
from decimal import Decimal
from types import SimpleNamespace

import dagster as dg
import httpx
import pytest
from sandbox_env import tripletex_env

from erp_pipelines.defs.build import build_definitions
from erp_pipelines.defs.runs import RANGE_END, RANGE_START
from erp_pipelines.model import months_between
from erp_pipelines.sandbox.common import serve
from erp_pipelines.sandbox.ledger import CHART, generate_ledger
from erp_pipelines.sandbox.tripletex import TripletexSandbox
from erp_pipelines.warehouse import Warehouse

THIS_MONTH = dt.date.today().replace(day=1)
HISTORY_START = dt.date(2025, 7, 1)
BALANCES = dg.AssetKey(["tripletex", "balances"])
MODELS = [dg.AssetKey(["reporting", name]) for name in ("trial_balance", "income_statement", "balance_sheet", "tenant_status")]
KIND = {str(number): kind for number, _, kind in CHART}
INCOME_KINDS = ("OPERATING_REVENUES", "INVESTMENT_INCOME")


@pytest.fixture(scope="module", params=["duckdb", "ducklake"])
def reported(tmp_path_factory, request):
    """Four Tripletex tenants (one without API-tilgang) and the rejected fixtures, extracted
    through Dagster, then the reporting models built by dbt in a run of their own; on each
    warehouse backend (the DuckDB file; DuckLake, the dbt target `lake`)."""
    tmp_path = tmp_path_factory.mktemp("reporting")
    if request.param == "ducklake":
        from postgres_support import ducklake_env

        lake = ducklake_env(request.getfixturevalue("postgres_cluster"), tmp_path / "lake-data")
    else:
        lake = {}
    ledger = generate_ledger(4, first_month=HISTORY_START, last_month=THIS_MONTH)
    sandbox = TripletexSandbox(ledger)
    blocked = ledger.valid_tenants[1]
    with (serve(sandbox.app, path="/v2") as url, dg.instance_for_test(temp_dir=str(tmp_path)) as instance,
          pytest.MonkeyPatch.context() as monkeypatch):
        env = tripletex_env(sandbox, url, tmp_path, TRIPLETEX_HISTORY_START=HISTORY_START.isoformat(), **lake)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        httpx.put(url.removesuffix("/v2") + f"/_sandbox/tripletex/clients/{blocked.erp_client_id}/api-access",
                  json={"enabled": False}, timeout=10).raise_for_status()
        defs = build_definitions(env)
        job = defs.resolve_implicit_global_asset_job_def()
        assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey(["tripletex", "clients"])]).success
        tenants = instance.get_dynamic_partitions("tripletex_tenants")
        extracted = job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey(["tripletex", "accounts"]), BALANCES],
            tags={RANGE_START: tenants[0], RANGE_END: tenants[-1]},
            run_config={"ops": {"tripletex__accounts_and_balances": {"config": {"full_sync": True}}}},
        )
        assert extracted.success  # the blocked tenant is a business failure
        report = job.execute_in_process(instance=instance, asset_selection=MODELS, raise_on_error=False)
        yield SimpleNamespace(ledger=ledger, blocked=blocked, defs=defs, report=report,
                              warehouse=Warehouse(env["ERP_WAREHOUSE_PATH"]))


def loaded_tenants(t):
    return [tenant for tenant in t.ledger.valid_tenants if tenant is not t.blocked]


def truth_rows(tenant):
    return tenant.expected_balances(months_between(HISTORY_START, THIS_MONTH))


def test_the_models_are_downstream_of_the_balances_in_the_asset_graph(reported):
    graph = reported.defs.resolve_asset_graph()
    downstream = dg.AssetSelection.assets(BALANCES).downstream().resolve(graph)
    assert set(MODELS) <= downstream
    assert BALANCES in graph.get(dg.AssetKey(["reporting", "trial_balance"])).parent_keys
    assert {graph.get(key).group_name for key in MODELS} == {"reporting"}


def test_the_dbt_tests_ran_as_asset_checks_and_passed(reported):
    assert reported.report.success
    assert {m.asset_key for m in reported.report.get_asset_materialization_events()
            if m.asset_key in MODELS} == set(MODELS)
    graph = reported.defs.resolve_asset_graph()
    expected = set(graph.get_check_keys_for_assets(set(MODELS)))
    evaluations = reported.report.get_asset_check_evaluations()
    assert len(expected) >= 15
    assert {e.asset_check_key for e in evaluations} == expected
    assert [e.asset_check_key.name for e in evaluations if not e.passed] == []


def test_trial_balance_equals_the_truth_ledger_per_tenant_and_month_to_the_ore(reported):
    for tenant in loaded_tenants(reported):
        rows = reported.warehouse.query(
            "SELECT period, account_number, opening, movement, closing, client_name FROM reporting.trial_balance "
            "WHERE erp = 'tripletex' AND org_number = ? ORDER BY period, account_number", [tenant.org_number])
        truth = truth_rows(tenant)
        assert [row[:5] for row in rows] == sorted(
            (b.period, b.account_number, b.opening, b.movement, b.closing) for b in truth)
        assert {row[5] for row in rows} == {tenant.name}
        sums = reported.warehouse.query(
            "SELECT period, sum(opening), sum(movement), sum(closing) FROM reporting.trial_balance "
            "WHERE erp = 'tripletex' AND org_number = ? GROUP BY period ORDER BY period", [tenant.org_number])
        truth_sums = defaultdict(lambda: [Decimal(0)] * 3)
        for b in truth:
            truth_sums[b.period] = [s + v for s, v in zip(truth_sums[b.period], (b.opening, b.movement, b.closing),
                                                          strict=True)]
        assert sums == [(period, *values) for period, values in sorted(truth_sums.items())]
    assert reported.warehouse.query(
        "SELECT count(*) FROM reporting.trial_balance WHERE org_number = ?", [reported.blocked.org_number]) == [(0,)]


def test_income_statement_income_equals_the_truth(reported):
    for tenant in loaded_tenants(reported):
        income = defaultdict(Decimal)
        sales = defaultdict(Decimal)
        for b in truth_rows(tenant):
            if KIND[b.account_number] in INCOME_KINDS:
                income[b.period] += b.movement
            if KIND[b.account_number] == "OPERATING_REVENUES":
                sales[b.period] += b.movement
        assert any(income.values())
        assert dict(reported.warehouse.query(
            "SELECT period, sum(movement) FROM reporting.income_statement WHERE erp = 'tripletex' AND org_number = ? "
            "AND account_class = 'income' GROUP BY period", [tenant.org_number])) == income
        assert dict(reported.warehouse.query(
            "SELECT period, movement FROM reporting.income_statement WHERE erp = 'tripletex' AND org_number = ? "
            "AND ns4102_class = 3", [tenant.org_number])) == sales


def test_balance_sheet_holds_the_assets_and_with_the_result_balances(reported):
    for tenant in loaded_tenants(reported):
        assets = defaultdict(Decimal)
        for b in truth_rows(tenant):
            if KIND[b.account_number] == "ASSETS":
                assets[b.period] += b.closing
        assert dict(reported.warehouse.query(
            "SELECT period, closing FROM reporting.balance_sheet WHERE erp = 'tripletex' AND org_number = ? "
            "AND ns4102_class = 1", [tenant.org_number])) == assets
        # balance sheet + the result to date = the trial balance, zero every month
        off = reported.warehouse.query(
            "SELECT period, sum(closing) FROM (SELECT period, closing FROM reporting.balance_sheet WHERE org_number = ? "
            "UNION ALL SELECT period, closing FROM reporting.income_statement WHERE org_number = ?) "
            "GROUP BY period HAVING sum(closing) <> 0", [tenant.org_number, tenant.org_number])
        assert off == []


def test_tenant_status_has_one_row_per_client_with_its_status_and_fix(reported):
    rows = reported.warehouse.query(
        "SELECT name, org_number, status, reason, last_success, last_error, fix FROM reporting.tenant_status "
        "WHERE erp = 'tripletex'")
    assert len(rows) == len(reported.ledger.tenants) == reported.warehouse.query(
        "SELECT count(*) FROM clients WHERE erp = 'tripletex'")[0][0]
    by_name = {row[0]: row for row in rows}
    assert len(by_name) == len(rows)
    for tenant in loaded_tenants(reported):
        _, org, status, _, last_success, last_error, fix = by_name[tenant.name]
        assert (org, status, last_error, fix) == (tenant.org_number, "active", None, None)
        assert last_success is not None
    _, _, status, reason, last_success, last_error, fix = by_name[reported.blocked.name]
    assert status == "no_api_access" and last_success is None
    assert "API-tilgang" in reason and "API-tilgang" in last_error
    assert fix.startswith("In the client's Tripletex, go to Regnskap → Innstillinger → Regnskapsførers tilgang")
    rejected = {row[0]: row[3] for row in rows if row[2] == "rejected"}
    assert set(rejected) == {"Uten Orgnr Testklient", "Feil Kontrollsiffer AS", "Dobbel Registrert Kopi AS"}
    assert rejected["Uten Orgnr Testklient"] == "has no organisation number; it cannot be activated"
